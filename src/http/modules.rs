//! The module registry protocol for the default upstream.

use super::{ApiError, AppState, respond};
use crate::cache::ModuleRelease;
use crate::registry::ModuleAddress;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub(super) fn module_address(
    ns: &str,
    name: &str,
    system: &str,
) -> Result<ModuleAddress, ApiError> {
    Ok(ModuleAddress {
        namespace: ns.try_into()?,
        name: name.try_into()?,
        system: system.try_into()?,
    })
}

/// `GET /v1/modules/{ns}/{name}/{system}/versions`
pub async fn versions(
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, name, system)) = path?;
    let module = module_address(&ns, &name, &system)?;
    let host = state.cache.default_host().clone();
    Ok(respond(state.cache.module_versions(&host, &module).await?))
}

type DownloadPath = (String, String, String, String);

/// `GET /v1/modules/{ns}/{name}/{system}/{version}/download`: `204 No Content` with
/// `X-Terraform-Get`, which Terraform and OpenTofu both accept.
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<DownloadPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, name, system, version)) = path?;
    let release = ModuleRelease {
        host: state.cache.default_host().clone(),
        module: module_address(&ns, &name, &system)?,
        version: version.try_into()?,
    };
    let base = state.public_base(&headers);
    let answer = state.cache.module_download(&release, &base).await?;
    let location = HeaderValue::from_str(&answer.location).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream module location is not a valid header value",
        )
    })?;
    Ok((
        StatusCode::NO_CONTENT,
        [
            ("x-terraform-get", location),
            (
                "x-cache-status",
                HeaderValue::from_static(answer.status.as_str()),
            ),
        ],
    )
        .into_response())
}
