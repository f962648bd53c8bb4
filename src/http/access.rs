//! The access guard: with `auth:` configured, every route but the health checks and discovery
//! asks [`crate::auth`] whether the caller may have it. Registry and mirror JSON need a token
//! that may read the route's upstream (or the upstream in `auth.anonymous_read`); artifacts
//! need a valid signature in their path, or such a token; `/metrics` needs the `metrics` or
//! `admin` scope, the admin API the `admin` scope, and the status page's data (`/ui/api/`)
//! `read` or `admin` (its shell and assets are open: they hold no data). It runs inside the route annotation (one middleware); without `auth:` it is
//! not there at all.

use super::ApiError;
use crate::auth::{Auth, Caller, Refusal};
use axum::extract::{RawPathParams, Request};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::sync::Arc;

/// What the guard needs: the rules, the host of routes without `{host}`, and the failure count.
#[derive(Clone)]
pub struct Guard {
    pub auth: Arc<Auth>,
    pub default_host: Arc<str>,
    pub failures: prometheus::IntCounterVec,
}

/// The prefix of the status page's data routes.
const UI_DATA: &str = "/ui/api/";

/// The prefix of signed artifact routes: `/artifacts/s/{exp}/{sig}/`.
const SIGNED_PREFIX: &str = "/artifacts/s/";

/// Whether the request may have its route: `Ok(None)` for the open routes, `Ok(Some(name))`
/// with the caller's name for the access log, or why not (with the caller's name too: a
/// token's name, `anonymous`, or `unknown` for a credential that matches no token).
pub fn check(
    g: &Guard,
    template: &str,
    params: &Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: &Request,
) -> Result<Option<Cow<'static, str>>, (Refusal, Cow<'static, str>)> {
    if matches!(
        template,
        "/healthz" | "/readyz" | "/.well-known/terraform.json"
    ) || (template.starts_with("/ui")
        && (!template.starts_with(UI_DATA) || template == "/ui/api/session"))
    {
        // The status page's shell and assets hold no data (the session says only whether a
        // token is needed and whose it is); they ask for a token.
        return Ok(None);
    }
    let param = |name: &str| super::log::path_param(params, name);
    // A credential in the request first; else a client certificate the listener verified.
    let identified = match g.auth.identify(req.headers()) {
        Ok(Caller::Anonymous) => Ok(client_certificate(req).map_or(Caller::Anonymous, |s| {
            Caller::Certificate(format!("cert:{s}"))
        })),
        other => other,
    };
    let name = match &identified {
        Ok(c) => c.name(),
        Err(_) => Cow::Borrowed("unknown"),
    };
    let decision = if template == "/metrics" {
        identified.and_then(|c| g.auth.may_scrape(&c))
    } else if template.starts_with("/admin/") {
        identified.and_then(|c| g.auth.may_administer(&c))
    } else if template.starts_with(UI_DATA) {
        identified.and_then(|c| g.auth.may_view_status(&c))
    } else {
        let host = param("host").unwrap_or(&g.default_host);
        if template.starts_with(SIGNED_PREFIX) {
            signed(&g.auth, req.uri().path(), param("exp"), param("sig")).or_else(|refusal| {
                // A token that may read the upstream opens an artifact URL too.
                identified
                    .ok()
                    .filter(|c| g.auth.may_read(c, host).is_ok())
                    .map(|_| ())
                    .ok_or(refusal)
            })
        } else {
            identified.and_then(|c| g.auth.may_read(&c, host))
        }
    };
    match decision {
        Ok(()) => Ok(Some(name)),
        Err(refusal) => {
            g.failures.with_label_values(&[refusal.reason()]).inc();
            Err((refusal, name))
        }
    }
}

/// The subject of the client certificate of the request's TLS connection, when one was
/// presented (rustls verified it against `server.tls.client_ca_file` before any request).
fn client_certificate(req: &Request) -> Option<String> {
    let info = req.extensions().get::<Arc<axum_server::tls::TlsInfo>>()?;
    crate::tls::subject(info.peer_certificates.first()?)
}

/// Verifies the signature in a signed artifact path against the rest of the path.
fn signed(auth: &Auth, path: &str, exp: Option<&str>, sig: Option<&str>) -> Result<(), Refusal> {
    let malformed = Refusal::Signature(crate::auth::signing::SignatureError::Malformed);
    let (Some(exp), Some(sig)) = (exp, sig) else {
        return Err(malformed);
    };
    let rest = path
        .strip_prefix(SIGNED_PREFIX)
        .and_then(|p| p.strip_prefix(exp))
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.strip_prefix(sig))
        .and_then(|p| p.strip_prefix('/'))
        .ok_or(malformed)?;
    auth.signer()
        .verify(exp, sig, rest, crate::storage::unix_now())
        .map_err(Refusal::Signature)
}

/// The answer to a refused request: its status, `WWW-Authenticate` on a 401, and what to do.
pub fn refuse(refusal: &Refusal) -> Response {
    let mut resp = ApiError::new(refusal.status(), refusal.message()).into_response();
    if refusal.status() == axum::http::StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"terrapeak\""),
        );
    }
    resp
}
