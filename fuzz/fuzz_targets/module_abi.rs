//! What the host decodes from a module (untrusted code): its manifest and the messages it
//! writes into its memory. Must never panic.
#![no_main]

use brume_module_abi::{CallResult, HistoryQuery, Manifest, Output, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::from_json(data);
    let _ = decode::<CallResult<Output>>(data);
    let _ = decode::<CallResult<()>>(data);
    let _ = decode::<HistoryQuery>(data);
});
