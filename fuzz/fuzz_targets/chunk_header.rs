//! On-disk decoders: chunk headers, volume metadata and the store identity must never panic on any
//! bytes a damaged disk could hold.
#![no_main]

use cairn_store::format::{ChunkHeader, TableEntry, VolumeMeta, decode_store_identity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ChunkHeader::decode(data) {
        // Whatever decodes re-encodes to the same bytes.
        assert_eq!(&h.encode()[..], &data[..cairn_store::format::HEADER_LEN]);
    }
    let _ = VolumeMeta::decode(data);
    let _ = decode_store_identity(data);
    for entry in data.chunks_exact(8) {
        let _ = TableEntry::decode(entry);
    }
});
