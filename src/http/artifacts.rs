//! Artifact routes: only what TerraPeak itself handed out in a rewritten answer. GET and HEAD,
//! with single ranges.

use super::{ApiError, AppState, parse_range, respond};
use crate::cache::{ModuleRelease, ProviderFile, ProviderRelease, Served, Want};
use crate::registry::{Platform, ProviderName};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::Response;

type ProviderArtifactPath = (String, String, String, String, String, String, String);

/// `GET|HEAD /artifacts/providers/{host}/{ns}/{type}/{version}/{os}/{arch}/{file}`
pub async fn provider(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<ProviderArtifactPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((host, ns, ty, version, os, arch, file)) = path?;
    let release = ProviderRelease {
        host: host.try_into()?,
        name: ProviderName {
            namespace: ns.try_into()?,
            provider_type: ty.try_into()?,
        },
        version: version.try_into()?,
        platform: Platform {
            os: os.try_into()?,
            arch: arch.try_into()?,
        },
    };
    let file = ProviderFile::parse(&file)?;
    let served = state
        .cache
        .provider_artifact(&release, &file, want(&method), parse_range(&headers))
        .await?;
    Ok(artifact_response(served))
}

type ModuleArtifactPath = (String, String, String, String, String, String);

/// `GET|HEAD /artifacts/modules/{host}/{ns}/{name}/{system}/{version}/{file}`
pub async fn module(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<ModuleArtifactPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((host, ns, name, system, version, file)) = path?;
    let release = ModuleRelease {
        host: host.try_into()?,
        module: super::modules::module_address(&ns, &name, &system)?,
        version: version.try_into()?,
    };
    let served = state
        .cache
        .module_artifact(&release, &file, want(&method), parse_range(&headers))
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
