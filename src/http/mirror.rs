//! The provider network mirror protocol: `/v1/mirror/{host}/{ns}/{type}/index.json` and
//! `/v1/mirror/{host}/{ns}/{type}/{version}.json`.

use super::{ApiError, AppState, Params, respond};
use crate::registry::Version;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

pub async fn document(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, ApiError> {
    let host = p.host(&state)?;
    let name = super::providers::provider_name(&p)?;
    let file = p.get("file")?;
    if file == "index.json" {
        return Ok(respond(state.cache.mirror_index(&host, &name).await?));
    }
    let version = file
        .strip_suffix(".json")
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not found"))?;
    let version = Version::try_from(version)?;
    let links = state.links(&headers);
    Ok(respond(
        state
            .cache
            .mirror_version(&host, &name, &version, &links)
            .await?,
    ))
}
