//! Artifact routes: only what TerraPeak itself handed out in a rewritten answer. GET and HEAD,
//! with single ranges.

use super::{ApiError, AppState, Params, parse_range, respond};
use crate::cache::{ModuleRelease, ProviderFile, ProviderRelease, Served, Want};
use crate::registry::Platform;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::Response;

/// `GET|HEAD /artifacts/providers/{host}/{ns}/{type}/{version}/{os}/{arch}/{file}`
pub async fn provider(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, ApiError> {
    let release = ProviderRelease {
        host: p.host(&state)?,
        name: super::providers::provider_name(&p)?,
        version: p.get("version")?.try_into()?,
        platform: Platform {
            os: p.get("os")?.try_into()?,
            arch: p.get("arch")?.try_into()?,
        },
    };
    let file = ProviderFile::parse(p.get("file")?)?;
    let served = state
        .cache
        .provider_artifact(&release, &file, want(&method), parse_range(&headers))
        .await?;
    Ok(artifact_response(served))
}

/// `GET|HEAD /artifacts/modules/{host}/{ns}/{name}/{system}/{version}/{file}`
pub async fn module(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, ApiError> {
    let release = ModuleRelease {
        host: p.host(&state)?,
        module: super::modules::module_address(&p)?,
        version: p.get("version")?.try_into()?,
    };
    let served = state
        .cache
        .module_artifact(
            &release,
            p.get("file")?,
            want(&method),
            parse_range(&headers),
        )
        .await?;
    Ok(artifact_response(served))
}

fn want(method: &Method) -> Want {
    if method == Method::HEAD {
        Want::HeadersOnly
    } else {
        Want::Body
    }
}

fn artifact_response(served: Served) -> Response {
    let mut resp = respond(served);
    resp.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp
}
