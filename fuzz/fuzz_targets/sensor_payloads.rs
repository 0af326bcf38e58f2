//! What the agent parses from sensors: MQTT payloads (JSON, bare numbers, line protocol)
//! and HTTP bodies. Must never panic; every accepted reading has a valid stream name and
//! fields that encode.
#![no_main]

use edge_agent::ingest::payload::{PayloadConfig, parse_http, parse_mqtt};
use libfuzzer_sys::fuzz_target;

const NOW_NS: i64 = 1_700_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let cfg = PayloadConfig::default();
    let results = [
        parse_mqtt("sensors/a", data, NOW_NS, &cfg),
        parse_http(Some("sensors/a"), Some("application/json"), data, NOW_NS, &cfg),
        parse_http(None, Some("text/plain"), data, NOW_NS, &cfg),
    ];
    for readings in results.into_iter().flatten() {
        for r in readings {
            brume_protocol::validate_stream_name(&r.stream).expect("accepted readings have valid stream names");
            r.fields.decode().expect("accepted readings have fields that decode");
        }
    }
});
