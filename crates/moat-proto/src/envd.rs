//! Messages of the envd-compatible services, generated from `proto/*.proto` by prost (binary
//! codec) and pbjson (proto3 canonical JSON codec: lowerCamelCase names, enums by name, 64-bit
//! integers as strings, bytes as base64, unknown fields ignored).

/// `process.Process`: start, connect to, list, feed and signal processes.
pub mod process {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `filesystem.Filesystem`: stat, list, make, move, remove and watch paths.
pub mod filesystem {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

#[cfg(test)]
mod tests {
    use super::filesystem::{EntryInfo, FileType};
    use super::process::{ProcessEvent, StartRequest, StartResponse, process_event};

    #[test]
    fn process_events_use_canonical_json() {
        let ev: StartResponse =
            serde_json::from_str(r#"{"event":{"data":{"stdout":"aGVsbG8K"}},"unknown":1}"#)
                .expect("decode");
        let Some(ProcessEvent {
            event: Some(process_event::Event::Data(d)),
        }) = ev.event
        else {
            panic!("not a data event: {ev:?}");
        };
        assert_eq!(
            d.output,
            Some(process_event::data_event::Output::Stdout(
                b"hello\n".to_vec()
            ))
        );
        let end = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::End(process_event::EndEvent {
                    exit_code: -1,
                    exited: false,
                    status: "signal: killed".into(),
                    error: None,
                })),
            }),
        };
        assert_eq!(
            serde_json::to_string(&end).expect("encode"),
            r#"{"event":{"end":{"exitCode":-1,"status":"signal: killed"}}}"#
        );
    }

    #[test]
    fn optional_fields_and_int64_as_string() {
        let req: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"]},"stdin":false}"#,
        )
        .expect("decode");
        assert_eq!(req.stdin, Some(false));
        let entry = EntryInfo {
            size: 11,
            r#type: FileType::File as i32,
            ..Default::default()
        };
        let text = serde_json::to_string(&entry).expect("encode");
        assert!(text.contains(r#""size":"11""#), "{text}");
        assert!(text.contains(r#""type":"FILE_TYPE_FILE""#), "{text}");
    }
}
