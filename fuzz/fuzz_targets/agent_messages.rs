//! What the hub decodes from the broker: batches (every version), their key, presence
//! and module reports. Must never panic; a decoded batch must survive re-encoding.
#![no_main]

use brume_protocol::{AgentMessage, AgentReport, AgentStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = AgentMessage::peek_key(data);
    if let Ok(msg) = AgentMessage::decode(data) {
        let again = AgentMessage::decode(&msg.encode()).expect("a decoded message re-encodes to a valid one");
        assert_eq!(again, msg);
        assert!(key.is_ok(), "a message that decodes has a key");
    }
    let _ = AgentStatus::decode_full(data);
    let _ = AgentReport::decode(data);
});
