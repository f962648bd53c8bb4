//! Client certificates (mutual TLS): `server.tls.client_ca_file` with `client_auth: required`
//! lets only clients with a certificate from that CA connect, and a verified certificate reads
//! every upstream without a token; with `optional`, clients without one may still send a token.

mod common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use reqwest::StatusCode;
use std::path::Path;
use terrapeak::config::{AuthConfig, ClientAuth, Secret, TokenConfig};

const TOKEN: &str = "tok-mtls-19ce";

/// A client CA and one client certificate it issued (CN=ci-runner), written as PEM files:
/// `client-ca.pem`, and `client.pem` holding the certificate and its key.
fn client_pki(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} client CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "ci-runner");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join(format!("{name}-client-ca.pem"));
    let client_path = dir.join(format!("{name}-client.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(
        &client_path,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )
    .unwrap();
    (ca_path, client_path)
}

fn client(tls: &TestTls, identity: Option<&Path>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls.path("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(ca)
        .no_proxy()
        .use_rustls_tls();
    if let Some(p) = identity {
        b = b.identity(reqwest::Identity::from_pem(&std::fs::read(p).unwrap()).unwrap());
    }
    b.build().unwrap()
}

fn auth() -> AuthConfig {
    AuthConfig {
        tokens: vec![TokenConfig {
            name: "ci".into(),
            token: Secret::new(TOKEN),
            scopes: vec!["read".into()],
            ..Default::default()
        }],
        url_signing_keys: vec![Secret::new("k")],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_admit_only_their_holders_and_need_no_token() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let pki = tempfile::tempdir().unwrap();
    let (ca, holder) = client_pki(pki.path(), "trusted");
    let (_, stranger) = client_pki(pki.path(), "other");
    let (tls, proxy) = start_tls_proxy(&up, |c| {
        c.server.tls.client_ca_file = Some(ca.clone());
        c.server.tls.client_auth = ClientAuth::Required;
        c.auth = Some(auth());
    })
    .await;
    let versions = proxy.url(&format!("/v1/providers/{NS}/{TYPE}/versions"));
    let resp = client(&tls, Some(&holder))
        .get(&versions)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The artifact URLs it is handed work for it too.
    let doc: serde_json::Value = client(&tls, Some(&holder))
        .get(proxy.url(&format!(
            "/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let zip = client(&tls, Some(&holder))
        .get(doc["download_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), StatusCode::OK);
    assert!(zip.bytes().await.unwrap() == up.zip("1.0.0", "linux", "amd64").1);
    // No certificate, or one from another CA: no connection at all, token or not.
    for identity in [None, Some(stranger.as_path())] {
        let refused = client(&tls, identity)
            .get(&versions)
            .bearer_auth(TOKEN)
            .send()
            .await;
        assert!(refused.is_err(), "{identity:?} connected: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_leave_tokens_working() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let pki = tempfile::tempdir().unwrap();
    let (ca, holder) = client_pki(pki.path(), "trusted");
    let (tls, proxy) = start_tls_proxy(&up, |c| {
        c.server.tls.client_ca_file = Some(ca.clone());
        c.server.tls.client_auth = ClientAuth::Optional;
        c.auth = Some(auth());
    })
    .await;
    let versions = proxy.url(&format!("/v1/providers/{NS}/{TYPE}/versions"));
    let anonymous = client(&tls, None).get(&versions).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let token = client(&tls, None)
        .get(&versions)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), StatusCode::OK);
    let cert = client(&tls, Some(&holder))
        .get(&versions)
        .send()
        .await
        .unwrap();
    assert_eq!(cert.status(), StatusCode::OK);
    // A certificate reads; it does not scrape metrics.
    let metrics = client(&tls, Some(&holder))
        .get(proxy.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::FORBIDDEN);
    let body = metrics.text().await.unwrap();
    assert!(body.contains("cert:CN=ci-runner"), "{body}");
}
