//! The query of `GET /v2/sandboxes`, as the E2B SDKs send it, turned into the engine's
//! listing query.
//!
//! - `metadata`: `k=v&k2=v2` with each key and value percent-encoded, sent as one query value
//!   (so encoded twice on the wire); every pair must match.
//! - `state`: a comma list of `running` and `paused`; both when absent.
//! - `startedAfter` (RFC 3339), `template` (a template name), `order` (`asc` or `desc` by start
//!   time, `desc` by default), `limit` (1 to [`MAX_LIST_LIMIT`], default [`MAX_LIST_LIMIT`]),
//!   `nextToken` (the previous page's `x-next-token`).
//!
//! Parameters it does not know are ignored, as the E2B API's are.

use moat_engine::listing::{SandboxQuery, is_page_token};
use moat_proto::v1::SandboxState;

use super::error::{E2bError, E2bResult};
use super::shapes::parse_rfc3339;
use crate::extract::decode;

/// Largest page of `GET /v2/sandboxes`, and its size when the query names none.
pub(crate) const MAX_LIST_LIMIT: u32 = 100;

/// Parses the raw query string of `GET /v2/sandboxes`.
pub(crate) fn parse(query: &str) -> E2bResult<SandboxQuery> {
    let mut filter = SandboxQuery {
        limit: MAX_LIST_LIMIT,
        newest_first: true,
        ..SandboxQuery::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (decode(name)?, decode(value)?);
        match name.as_str() {
            "metadata" => filter.metadata.extend(metadata(&value)?),
            "state" => {
                for state in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    filter.states.push(match state {
                        "running" => SandboxState::Running,
                        "paused" => SandboxState::Paused,
                        other => {
                            return Err(E2bError::invalid(format!(
                                "unknown state {other:?}: expected running or paused"
                            )));
                        }
                    });
                }
            }
            "startedAfter" => {
                let at = parse_rfc3339(&value).ok_or_else(|| {
                    E2bError::invalid(format!(
                        "startedAfter {value:?} is not an RFC 3339 time with an offset"
                    ))
                })?;
                filter.created_since = Some(at);
            }
            "template" => filter.template = Some(value),
            "order" => {
                filter.newest_first = match value.as_str() {
                    "asc" => false,
                    "desc" => true,
                    other => {
                        return Err(E2bError::invalid(format!(
                            "unknown order {other:?}: expected asc or desc"
                        )));
                    }
                }
            }
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                    .ok_or_else(|| {
                        E2bError::invalid(format!(
                            "limit {value:?} must be a number from 1 to {MAX_LIST_LIMIT}"
                        ))
                    })?;
            }
            "nextToken" => {
                if !is_page_token(&value) {
                    return Err(E2bError::invalid(format!(
                        "nextToken {value:?} is not a token this server handed out"
                    )));
                }
                filter.after = Some(value);
            }
            _ => {}
        }
    }
    if filter.states.is_empty() {
        filter.states = vec![SandboxState::Running, SandboxState::Paused];
    }
    Ok(filter)
}

/// The pairs of a `metadata` filter (already decoded once as a query value).
fn metadata(value: &str) -> E2bResult<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for pair in value.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // A form's decoding, then the percent-encoding the SDK applied to each key and value.
        let inner = |s: &str| -> E2bResult<String> {
            let once = decode(s)?;
            percent_encoding::percent_decode_str(&once)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| E2bError::invalid(format!("metadata filter {s:?} is not UTF-8")))
        };
        let key = inner(k)?;
        if key.is_empty() {
            return Err(E2bError::invalid(format!(
                "metadata filter {pair:?} has no key"
            )));
        }
        pairs.push((key, inner(v)?));
    }
    Ok(pairs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let f = parse("").unwrap();
        assert_eq!(f.limit, MAX_LIST_LIMIT);
        assert!(f.newest_first);
        assert_eq!(f.states, [SandboxState::Running, SandboxState::Paused]);
        assert!(f.metadata.is_empty() && f.after.is_none());
    }

    #[test]
    fn the_sdks_encoding() {
        // What the Python SDK sends for metadata {"suite a": "x/y", "n": "1"}: each key and
        // value quoted, joined as a form, and the whole encoded again as one query value.
        let f = parse(
            "metadata=suite%252520a%3Dx%252Fy%26n%3D1&state=running&limit=5&order=asc\
             &template=base&startedAfter=2025-01-01T00%3A00%3A00%2B00%3A00&nextToken=5.abcdefghijklmnop\
             &unknown=1",
        )
        .unwrap();
        assert_eq!(
            f.metadata,
            [
                ("suite a".to_owned(), "x/y".to_owned()),
                ("n".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(f.states, [SandboxState::Running]);
        assert_eq!(f.limit, 5);
        assert!(!f.newest_first);
        assert_eq!(f.template.as_deref(), Some("base"));
        assert_eq!(f.created_since, Some(1_735_689_600_000));
        // Carried as the engine decodes it: the page after (5, abcdefghijklmnop).
        assert_eq!(f.after.as_deref(), Some("5.abcdefghijklmnop"));
    }

    #[test]
    fn bad_values_are_400() {
        for bad in [
            "state=killed",
            "limit=0",
            "limit=101",
            "limit=x",
            "order=sideways",
            "startedAfter=yesterday",
            "nextToken=garbage",
            "metadata=%3Dv",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
    }
}
