//! NBD option payload parsers (INFO/GO, LIST/SET_META_CONTEXT): any bytes, never a panic, and
//! never more work than the bytes allow.
#![no_main]

use cairn_nbd::proto::{parse_info_request, parse_meta_context_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
});
