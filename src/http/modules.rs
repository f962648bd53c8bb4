//! The module registry protocol: for the default upstream under `/v1/modules/`, and for a named
//! upstream under `/r/{host}/v1/modules/` (transparent mode).

use super::{ApiError, AppState, Params, respond};
use crate::cache::ModuleRelease;
use crate::registry::ModuleAddress;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub(super) fn module_address(p: &Params) -> Result<ModuleAddress, ApiError> {
    Ok(ModuleAddress {
        namespace: p.get("ns")?.try_into()?,
        name: p.get("name")?.try_into()?,
        system: p.get("system")?.try_into()?,
    })
}

/// `GET [/r/{host}]/v1/modules/{ns}/{name}/{system}/versions`
pub async fn versions(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let host = p.host(&state)?;
    let module = module_address(&p)?;
    Ok(respond(state.cache.module_versions(&host, &module).await?))
}

/// `GET [/r/{host}]/v1/modules/{ns}/{name}/{system}/{version}/download`: `204 No Content` with
/// `X-Terraform-Get`, which Terraform and OpenTofu both accept.
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, ApiError> {
    let release = ModuleRelease {
        host: p.host(&state)?,
        module: module_address(&p)?,
        version: p.get("version")?.try_into()?,
    };
    let links = state.links(&headers);
    let answer = state.cache.module_download(&release, &links).await?;
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
