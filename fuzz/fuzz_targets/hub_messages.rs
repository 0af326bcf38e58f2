//! What an agent decodes from the broker: acks, hub announcements and desired states, signed
//! or not. Must never panic.
#![no_main]

use brume_protocol::{DesiredState, HubAnnouncement, HubKind, HubMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [HubKind::Ack, HubKind::Announcement, HubKind::Desired] {
        if let Ok(Some(signed)) = kind.signed_part(data) {
            // The signature covers `message` as received, never a re-encoding; sealing
            // what was split gives it back unchanged.
            assert_eq!(kind.signed_part(&kind.seal(signed.clone())), Ok(Some(signed)));
        }
    }
    let _ = HubMessage::decode(data);
    let _ = HubAnnouncement::decode(data);
    let _ = DesiredState::decode(data);
});
