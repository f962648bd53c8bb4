//! `terrapeak client-config`: the Terraform CLI configuration that points Terraform at this
//! TerraPeak, built from the running configuration (public URL, upstreams).

use crate::config::{Config, ConfigError};

/// How Terraform is pointed at TerraPeak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Registry,
    Transparent,
    Mirror,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "registry" => Ok(Mode::Registry),
            "transparent" => Ok(Mode::Transparent),
            "mirror" => Ok(Mode::Mirror),
            other => Err(format!(
                "unknown mode {other:?}; use registry, transparent or mirror"
            )),
        }
    }
}

/// The base URL clients use: `server.domain`, else the listen address (https when TLS is on).
pub fn public_base(config: &Config) -> Result<String, ConfigError> {
    if let Some(domain) = &config.server.domain {
        return Ok(domain.trim_end_matches('/').to_owned());
    }
    let scheme = if config.server.tls.cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    let addr = config.listen_addr()?;
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    Ok(format!("{scheme}://{host}"))
}

/// Renders the CLI configuration for `mode`.
pub fn render(config: &Config, mode: Mode) -> Result<String, ConfigError> {
    let base = public_base(config)?;
    let hosts: Vec<String> = config
        .upstream_endpoints()?
        .into_iter()
        .map(|e| e.host.to_string())
        .collect();
    let mut out = String::new();
    match mode {
        Mode::Registry => {
            let proxy_host = base
                .split_once("://")
                .map_or(base.as_str(), |(_, rest)| rest)
                .to_owned();
            out.push_str(&format!(
                "# Registry mode: no CLI configuration is needed. Name TerraPeak's host in sources:\n\
                 #   source = \"{proxy_host}/hashicorp/aws\"                     (providers)\n\
                 #   source = \"{proxy_host}/terraform-aws-modules/vpc/aws\"    (modules)\n\
                 # This changes provider identity in lock files ({proxy_host}/hashicorp/aws).\n\
                 # Everything is fetched from {} upstream.\n",
                hosts[0]
            ));
        }
        Mode::Transparent => {
            out.push_str(
                "# Transparent mode: sources and lock files stay unchanged; the registry protocol of\n\
                 # each host below goes through TerraPeak, for providers and modules. Terraform still\n\
                 # checks provider signatures and records every platform's zh: hash.\n",
            );
            for host in &hosts {
                out.push_str(&format!(
                    "host \"{host}\" {{\n  services = {{\n    \"providers.v1\" = \"{base}/r/{host}/v1/providers/\",\n    \"modules.v1\"   = \"{base}/r/{host}/v1/modules/\",\n  }}\n}}\n"
                ));
            }
        }
        Mode::Mirror => {
            out.push_str(&format!(
                "# Network mirror mode: providers only (modules still come from their registries).\n\
                 # Sources and provider identity stay unchanged; Terraform records only the local\n\
                 # h1: hash in lock files (OpenTofu 1.12+ with trust_all_hashes also records the zh:\n\
                 # hashes TerraPeak lists). Hosts served: {}.\n\
                 provider_installation {{\n  network_mirror {{\n    url = \"{base}/v1/mirror/\"\n  }}\n}}\n",
                hosts.join(", ")
            ));
        }
    }
    if config.auth.is_some() {
        let proxy_host = base
            .split_once("://")
            .map_or(base.as_str(), |(_, rest)| rest)
            .trim_end_matches('/')
            .to_owned();
        // Terraform looks credentials up by the host it resolves services for: TerraPeak's
        // own host in registry and mirror modes, each upstream's name in transparent mode.
        let credential_hosts = match mode {
            Mode::Transparent => hosts.clone(),
            Mode::Registry | Mode::Mirror => vec![proxy_host.clone()],
        };
        out.push_str(
            "# Access control is on: Terraform must send one of auth.tokens. Either a credentials\n\
             # block (token elided; paste yours):\n",
        );
        for host in &credential_hosts {
            out.push_str(&format!("credentials \"{host}\" {{\n  token = \"…\"\n}}\n"));
        }
        out.push_str("# or the environment:\n");
        for host in &credential_hosts {
            out.push_str(&format!("#   {}=…\n", tf_token_var(host)));
        }
        let machine = proxy_host.split(':').next().unwrap_or(&proxy_host);
        out.push_str(&format!(
            "# Artifact URLs carry their own signature, so downloads need nothing more. Terraform\n\
             # 1.11+ also sends ~/.netrc credentials with some downloads; this line works there:\n\
             #   machine {machine} login terrapeak password …\n"
        ));
    }
    if base.starts_with("https://") {
        out.push_str("# With a private CA, start Terraform with SSL_CERT_FILE=/path/to/ca.pem.\n");
    } else {
        out.push_str(match mode {
            // Service URLs in a `host` block may be plain HTTP; only the registry host itself
            // (discovery) and network mirrors must be HTTPS.
            Mode::Transparent => {
                "# Plain http:// service URLs work in a host block (for a TerraPeak on a trusted\n\
                 # network or on localhost); set server.domain to its https:// URL otherwise.\n"
            }
            Mode::Registry => {
                "# Registry mode needs HTTPS: Terraform discovers services at https://HOST/.well-known/.\n\
                 # Serve TerraPeak with server.tls or behind a TLS proxy, and set server.domain to its\n\
                 # https:// URL.\n"
            }
            Mode::Mirror => {
                "# Network mirror mode needs HTTPS: Terraform refuses an http:// mirror URL. Serve\n\
                 # TerraPeak with server.tls or behind a TLS proxy, and set server.domain to its\n\
                 # https:// URL (or use transparent mode, which accepts http://).\n"
            }
        });
    }
    Ok(out)
}

/// Terraform's environment variable for a host's token: `TF_TOKEN_` and the host with `.` as
/// `_` and `-` as `__` (a port's `:` has no spelling there, so such hosts need a credentials
/// block).
fn tf_token_var(host: &str) -> String {
    if host.contains(':') {
        return format!(
            "(no TF_TOKEN_ variable for {host}: hosts with a port need the credentials block)"
        );
    }
    format!("TF_TOKEN_{}", host.replace('-', "__").replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamEntry;

    #[test]
    fn transparent_mode_lists_every_upstream_under_the_public_url() {
        let mut c = Config::default();
        c.server.domain = Some("https://tp.example.com/".into());
        c.upstreams.push(UpstreamEntry {
            host: "registry.opentofu.org".into(),
            ..Default::default()
        });
        let out = render(&c, Mode::Transparent).unwrap();
        assert!(out.contains("host \"registry.terraform.io\""), "{out}");
        assert!(
            out.contains("\"https://tp.example.com/r/registry.opentofu.org/v1/modules/\""),
            "{out}"
        );
        let reg = render(&c, Mode::Registry).unwrap();
        assert!(reg.contains("tp.example.com/hashicorp/aws"), "{reg}");
    }

    #[test]
    fn only_registry_and_mirror_modes_need_https() {
        let c = Config::default();
        let transparent = render(&c, Mode::Transparent).unwrap();
        assert!(
            transparent.contains("http://127.0.0.1:8081/r/"),
            "{transparent}"
        );
        assert!(
            transparent.contains("Plain http:// service URLs work"),
            "{transparent}"
        );
        assert!(!transparent.contains("needs HTTPS"), "{transparent}");
        for mode in [Mode::Registry, Mode::Mirror] {
            let out = render(&c, mode).unwrap();
            assert!(out.contains("needs HTTPS"), "{out}");
        }
        let mut tls = Config::default();
        tls.server.domain = Some("https://tp.example.com".into());
        for mode in [Mode::Registry, Mode::Transparent, Mode::Mirror] {
            let out = render(&tls, mode).unwrap();
            assert!(!out.contains("needs HTTPS"), "{out}");
            assert!(out.contains("SSL_CERT_FILE"), "{out}");
        }
    }

    #[test]
    fn with_auth_on_the_credentials_are_printed_for_the_hosts_terraform_asks_for() {
        let mut c = Config::default();
        c.server.domain = Some("https://tp.example-corp.com".into());
        c.auth = Some(crate::config::AuthConfig {
            tokens: vec![crate::config::TokenConfig {
                name: "ci".into(),
                token: crate::config::Secret::new("tok-secret-value"),
                scopes: vec!["read".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let reg = render(&c, Mode::Registry).unwrap();
        assert!(reg.contains("credentials \"tp.example-corp.com\""), "{reg}");
        assert!(reg.contains("TF_TOKEN_tp_example__corp_com"), "{reg}");
        assert!(
            reg.contains("machine tp.example-corp.com login terrapeak password"),
            "{reg}"
        );
        let tr = render(&c, Mode::Transparent).unwrap();
        assert!(tr.contains("credentials \"registry.terraform.io\""), "{tr}");
        assert!(tr.contains("TF_TOKEN_registry_terraform_io"), "{tr}");
        for out in [reg, tr, render(&c, Mode::Mirror).unwrap()] {
            assert!(!out.contains("tok-secret-value"), "{out}");
        }
        assert!(
            !render(&Config::default(), Mode::Registry)
                .unwrap()
                .contains("credentials")
        );
    }

    #[test]
    fn without_a_domain_the_listen_address_is_used() {
        let mut c = Config::default();
        c.server.addr = ":8443".into();
        assert_eq!(public_base(&c).unwrap(), "http://localhost:8443");
    }
}
