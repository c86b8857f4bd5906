//! Chunk versions: defined in `cairn-types` (the wire and the store carry them too), re-exported
//! here where the decisions that use them live.

pub use cairn_types::version::{Expected, Version};
