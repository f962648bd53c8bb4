//! The provider registry protocol: for the default upstream under `/v1/providers/`, and for a
//! named upstream under `/r/{host}/v1/providers/` (transparent mode).

use super::{ApiError, AppState, Params, respond};
use crate::cache::ProviderRelease;
use crate::registry::{Platform, ProviderName};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

pub(super) fn provider_name(p: &Params) -> Result<ProviderName, ApiError> {
    Ok(ProviderName {
        namespace: p.get("ns")?.try_into()?,
        provider_type: p.get("ty")?.try_into()?,
    })
}

/// `GET [/r/{host}]/v1/providers/{ns}/{type}/versions`
pub async fn versions(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let host = p.host(&state)?;
    let name = provider_name(&p)?;
    Ok(respond(state.cache.provider_versions(&host, &name).await?))
}

/// `GET [/r/{host}]/v1/providers/{ns}/{type}/{version}/download/{os}/{arch}`
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, ApiError> {
    let release = ProviderRelease {
        host: p.host(&state)?,
        name: provider_name(&p)?,
        version: p.get("version")?.try_into()?,
        platform: Platform {
            os: p.get("os")?.try_into()?,
            arch: p.get("arch")?.try_into()?,
        },
    };
    let links = state.links(&headers);
    Ok(respond(
        state.cache.provider_download(&release, &links).await?,
    ))
}
