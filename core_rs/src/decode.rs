//! Fluent Forward Protocol v1 decoding, straight from msgpack bytes into records.

use crate::ids::ExtId;

#[derive(Clone, Debug, PartialEq)]
pub enum DecodeError {
    /// The buffer ends before the frame does: read more bytes and try again.
    Incomplete,
    /// The bytes can never become a valid frame: close the connection with this reason.
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_entries: usize,
    pub max_array: usize,
    pub max_map: usize,
    pub max_str: usize,
    pub max_decompressed_bytes: usize,
}

/// A producer's event id for de-duplication (`"id"` in the record).
pub type EventId = ExtId;

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Interaction {
        user: ExtId,
        item: ExtId,
        kind: Option<String>,
        weight: Option<f32>,
        id: Option<EventId>,
        ts: f64,
    },
    ItemUpsert {
        item: ExtId,
        tags: Vec<String>,
        category: Option<String>,
        available: Option<bool>,
        ts: f64,
    },
    EraseUser {
        user: ExtId,
        ts: f64,
    },
}

#[derive(Clone, Debug, Default)]
pub struct Frame {
    pub tag: String,
    pub records: Vec<Record>,
    /// Per-entry rejections: (entry index, reason). The frame itself stays valid.
    pub rejected: Vec<(usize, String)>,
    pub chunk: Option<String>,
}

/// Decodes one frame from the start of `buf`; returns it and the bytes it used.
pub fn decode_frame(buf: &[u8], limits: &Limits) -> Result<(Frame, usize), DecodeError> {
    todo!()
}
impl Default for Limits { fn default() -> Self { todo!() } }
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<usize, DecodeError> { todo!() }
