//! The provider registry protocol for the default upstream.

use super::{ApiError, AppState, respond};
use crate::cache::ProviderRelease;
use crate::registry::{Platform, ProviderName};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;

fn provider_name(ns: &str, ty: &str) -> Result<ProviderName, ApiError> {
    Ok(ProviderName {
        namespace: ns.try_into()?,
        provider_type: ty.try_into()?,
    })
}

/// `GET /v1/providers/{ns}/{type}/versions`
pub async fn versions(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, ty)) = path?;
    let name = provider_name(&ns, &ty)?;
    let host = state.cache.default_host().clone();
    Ok(respond(state.cache.provider_versions(&host, &name).await?))
}

type DownloadPath = (String, String, String, String, String);

/// `GET /v1/providers/{ns}/{type}/{version}/download/{os}/{arch}`
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<DownloadPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, ty, version, os, arch)) = path?;
    let release = ProviderRelease {
        host: state.cache.default_host().clone(),
        name: provider_name(&ns, &ty)?,
        version: version.try_into()?,
        platform: Platform {
            os: os.try_into()?,
            arch: arch.try_into()?,
        },
    };
    let base = state.public_base(&headers);
    Ok(respond(
        state.cache.provider_download(&release, &base).await?,
    ))
}
