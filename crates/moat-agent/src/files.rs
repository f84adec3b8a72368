//! The plain HTTP `/files` routes: download (`GET`) and upload (`POST`), with the access-token or
//! signed-URL check of `shared/reference/e2b-wire.md` §7.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::ResponseBody;
use crate::state::AgentState;

/// Answers a request whose path is `/files`.
pub async fn handle(_state: Arc<AgentState>, _req: Request<Incoming>) -> Response<ResponseBody> {
    let body = http_body_util::Full::new(Bytes::from_static(
        br#"{"code":501,"message":"/files not implemented yet"}"#,
    ))
    .map_err(|never| match never {})
    .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::NOT_IMPLEMENTED;
    resp
}
