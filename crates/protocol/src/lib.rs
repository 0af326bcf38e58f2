//! Wire types between Brume edge agents and the cloud hub.
//!
//! Everything that crosses the network between an agent and the hub is defined here and
//! encoded with [postcard]. postcard is compact and stable, but *positional*: it is not
//! self-describing, so the rules for changing this file are strict:
//!
//! * Every top-level message is an enum whose variant index is the wire version
//!   ([`AgentMessage::BatchV1`], [`AgentMessage::BatchV2`], [`HubMessage::AckV1`]). A new version is a new variant
//!   appended at the end; existing variants and their structs are never reordered,
//!   removed or changed. The golden-bytes tests at the bottom of this file fail when
//!   someone breaks that rule by accident.
//! * A reading's fields travel and are stored as one opaque *fields blob*
//!   (`postcard(Vec<Field>)`, see [`FieldsBlob`]). The agent stores exactly these bytes in
//!   SQLite, the batch carries them unchanged, and the hub stores them unchanged, so the
//!   hot path never re-encodes fields. Anyone who reads them decodes with
//!   [`FieldsBlob::decode`], which also enforces the limits in [`limits`].
//!
//! Architecture invariant: this crate does no IO and depends on no async runtime.

use serde::{Deserialize, Serialize};

/// Limits every decoder enforces. They are part of the protocol: an agent must never
/// produce a message a hub would refuse.
pub mod limits {
    /// Longest stream name, in bytes.
    pub const MAX_STREAM_NAME: usize = 256;
    /// Longest field name, in bytes.
    pub const MAX_FIELD_NAME: usize = 128;
    /// Longest string field value, in bytes.
    pub const MAX_STRING_VALUE: usize = 16 * 1024;
    /// Most fields on one reading.
    pub const MAX_FIELDS: usize = 256;
    /// Longest agent id, in bytes.
    pub const MAX_AGENT_ID: usize = 128;
    /// Largest encoded message the hub accepts (a batch), in bytes.
    pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
    /// Earliest reading timestamp: 2000-01-01T00:00:00Z, in ns. Older timestamps are
    /// almost always a unit mistake (seconds read as milliseconds) or an unset clock.
    pub const MIN_TS_NS: i64 = 946_684_800 * 1_000_000_000;
    /// First reading timestamp refused: 2200-01-01T00:00:00Z, in ns.
    pub const MAX_TS_NS: i64 = 7_258_118_400 * 1_000_000_000;
}

/// One field value of a reading: the InfluxDB point model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// A 64-bit float (the default for numbers).
    F64(f64),
    /// A signed integer (line protocol `12i`, JSON integers that do not fit a float exactly).
    I64(i64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
}

/// A named field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    /// Field name, e.g. `temperature`. A bare-number payload becomes the field `value`.
    pub name: String,
    /// The value.
    pub value: Value,
}

/// A reading as the agent ingests it: a timestamped record on a named stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Stream name, e.g. `sensors/line1/temp`.
    pub stream: String,
    /// Timestamp, nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// The encoded fields (`postcard(Vec<Field>)`).
    pub fields: FieldsBlob,
}

impl Reading {
    /// Builds a reading, encoding and validating its fields.
    pub fn new(stream: impl Into<String>, ts_ns: i64, fields: &[Field]) -> Result<Self, DecodeError> {
        let stream = stream.into();
        validate_stream_name(&stream)?;
        validate_timestamp(ts_ns)?;
        Ok(Reading { stream, ts_ns, fields: FieldsBlob::encode(fields)? })
    }
}

/// The canonical encoding of a reading's fields: `postcard(Vec<Field>)`.
///
/// Kept as bytes so that the agent's store, the wire and the hub's store share one
/// representation and nothing on the hot path decodes and re-encodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldsBlob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl FieldsBlob {
    /// Validates and encodes fields. Fails on an empty list, too many fields, bad names
    /// or oversize strings, naming which.
    pub fn encode(fields: &[Field]) -> Result<Self, DecodeError> {
        validate_fields(fields)?;
        Ok(FieldsBlob(postcard::to_stdvec(fields).expect("encoding to a Vec cannot fail")))
    }

    /// Decodes and validates the fields.
    pub fn decode(&self) -> Result<Vec<Field>, DecodeError> {
        let (fields, rest): (Vec<Field>, _) = postcard::take_from_bytes(&self.0)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        validate_fields(&fields)?;
        Ok(fields)
    }
}

/// Why an agent dropped readings without forwarding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LossReason {
    /// Deleted by the stream's retention (age or bytes) before the hub acknowledged it.
    Retention,
    /// Deleted to make room because the store was full and the stream's policy is `drop_oldest`.
    StoreFull,
}

impl LossReason {
    /// Stable lower-case name used in metrics and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Retention => "retention",
            LossReason::StoreFull => "store_full",
        }
    }
}

/// Cumulative count of readings an agent (in one store epoch) dropped for one stream and
/// reason. Cumulative, so the hub can keep the maximum it has seen and re-sends are harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    /// The stream that lost readings.
    pub stream: String,
    /// Why.
    pub reason: LossReason,
    /// Total readings dropped for this stream and reason since the store was created.
    pub total: u64,
}

/// One reading inside a [`StreamChunk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Timestamp, nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// The reading's fields.
    pub fields: FieldsBlob,
}

/// The readings of one stream inside a batch, in the agent's ingest order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Stream name.
    pub stream: String,
    /// Readings, oldest first.
    pub points: Vec<Point>,
}

/// A batch of readings from one agent: the unit of forwarding, acknowledgement and dedup.
///
/// `(agent_id, epoch, seq)` identifies a batch forever: an agent never reuses a sequence
/// number within an epoch, and a re-sent batch carries the same readings (or, if local
/// retention deleted some of them meanwhile, fewer, accounted for in `losses`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchV1 {
    /// The agent's configured id. Must match the id in the MQTT topic.
    pub agent_id: String,
    /// Random id of the agent's store, chosen when the store is created. A wiped data
    /// directory starts a new epoch, so its sequence numbers restarting at 1 are not
    /// mistaken for duplicates.
    pub epoch: u64,
    /// Per-agent, per-epoch batch sequence number: 1, 2, 3, … without holes.
    pub seq: u64,
    /// When the agent cut the batch, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Readings grouped by stream.
    pub streams: Vec<StreamChunk>,
    /// The agent's cumulative loss counters at the time the batch was sent.
    pub losses: Vec<LossReport>,
}

impl BatchV1 {
    /// Number of readings in the batch.
    pub fn reading_count(&self) -> usize {
        self.streams.iter().map(|s| s.points.len()).sum()
    }
}

/// Longest module name or version string in lineage, in bytes.
pub const MAX_MODULE_LABEL: usize = 128;

/// Identifies the WASM module build that computed some readings: its manifest name and
/// version, for people, and the sha256 of the `.wasm` file, which is what identifies
/// the code exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModuleRef {
    /// Module name from its manifest (or the agent config).
    pub name: String,
    /// Module version from its manifest.
    pub version: String,
    /// sha256 of the module file.
    pub sha256: [u8; 32],
}

impl ModuleRef {
    /// The hash as 64 lower-case hex digits.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits into a hash.
    pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(out)
    }
}

/// Lineage of one chunk of a [`BatchV2`]: which module computed its readings. Chunks
/// without an entry were ingested as they arrived, not computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLineage {
    /// Index of the chunk in [`BatchV2::streams`].
    pub chunk: u32,
    /// The module that produced every reading of that chunk.
    pub module: ModuleRef,
}

/// Version 2 batch: [`BatchV1`] plus lineage, so the hub can tell which module build
/// computed which readings. A stream's readings may arrive in several chunks of one
/// batch when different producers (ingest, module versions) wrote to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchV2 {
    /// The agent's configured id. Must match the id in the MQTT topic.
    pub agent_id: String,
    /// Random id of the agent's store (see [`BatchV1::epoch`]).
    pub epoch: u64,
    /// Per-agent, per-epoch batch sequence number: 1, 2, 3, … without holes.
    pub seq: u64,
    /// When the agent cut the batch, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Readings grouped by stream and producer, in the agent's ingest order per stream.
    pub streams: Vec<StreamChunk>,
    /// The agent's cumulative loss counters at the time the batch was sent.
    pub losses: Vec<LossReport>,
    /// Producer of each computed chunk, ascending by chunk index.
    pub lineage: Vec<ChunkLineage>,
}

impl BatchV2 {
    /// Number of readings in the batch.
    pub fn reading_count(&self) -> usize {
        self.streams.iter().map(|s| s.points.len()).sum()
    }

    /// The module that computed chunk `i`, if any.
    pub fn module_of(&self, chunk: usize) -> Option<&ModuleRef> {
        self.lineage.binary_search_by_key(&chunk, |l| l.chunk as usize).ok().map(|i| &self.lineage[i].module)
    }
}

impl From<BatchV1> for BatchV2 {
    fn from(b: BatchV1) -> Self {
        BatchV2 {
            agent_id: b.agent_id,
            epoch: b.epoch,
            seq: b.seq,
            created_ms: b.created_ms,
            streams: b.streams,
            losses: b.losses,
            lineage: Vec::new(),
        }
    }
}

/// The batch version this build sends; hubs accept every version.
pub type Batch = BatchV2;

/// Messages an agent sends to the hub. The variant index is the wire version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Version 1 batch (agents before lineage).
    BatchV1(BatchV1),
    /// Version 2 batch: with module lineage.
    BatchV2(BatchV2),
    /// Version 3 batch: the same fields as version 2, and stream names (of chunks and
    /// losses) may name a **re-processed variant** of a stream, `<stream>#<sha256 hex>`
    /// ([`variant_stream`]): results of re-running that module build over past readings,
    /// which the hub stores beside the stream, not in it. A chunk of a variant must have
    /// lineage naming the same build. Agents send version 2 when a batch has no variant.
    BatchV3(BatchV2),
}

/// Separates a stream name from the build of its re-processed variant
/// (`temp.alarm#<sha256 hex>`). Stream names never contain it ([`validate_stream_name`]
/// refuses `#`), so a variant never collides with a stream.
pub const VARIANT_SEP: char = '#';

/// The name of the re-processed variant of `stream` computed by the build `sha256`.
pub fn variant_stream(stream: &str, sha256: &[u8; 32]) -> String {
    let mut s = String::with_capacity(stream.len() + 65);
    s.push_str(stream);
    s.push(VARIANT_SEP);
    for b in sha256 {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Splits a stored stream name into the stream and, for a re-processed variant, the
/// build's sha256 as hex (not validated; see [`validate_variant_name`]).
pub fn split_variant(name: &str) -> (&str, Option<&str>) {
    match name.split_once(VARIANT_SEP) {
        Some((base, build)) => (base, Some(build)),
        None => (name, None),
    }
}

/// Checks a stream name that may be a re-processed variant: a valid stream name,
/// optionally followed by `#` and 64 lower-case hex digits. Returns the build, if any.
pub fn validate_variant_name(name: &str) -> Result<Option<[u8; 32]>, DecodeError> {
    let (base, build) = split_variant(name);
    validate_stream_name(base)?;
    match build {
        None => Ok(None),
        Some(hex) => {
            let lower = hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            match ModuleRef::parse_sha256(hex).filter(|_| lower) {
                Some(sha) => Ok(Some(sha)),
                None => Err(invalid(
                    "stream name",
                    format!("{name:?}: a re-processed variant is `<stream>#<64 lower-case hex digits>`"),
                )),
            }
        }
    }
}

/// The hub's acknowledgement: these batches are durably committed (or were already).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckV1 {
    /// The store epoch the sequence numbers belong to.
    pub epoch: u64,
    /// Committed batch sequence numbers.
    pub seqs: Vec<u64>,
}

/// Messages the hub sends to one agent. The variant index is the wire version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubMessage {
    /// Version 1 acknowledgement.
    AckV1(AckV1),
    /// A message of this envelope (an `AckV1`) signed by the hub: see [`SignedV1`].
    SignedV1(SignedV1),
}

/// A hub-to-agent message signed with a hub's ed25519 key (the `SignedV1` variant of
/// [`HubMessage`], [`HubAnnouncement`] and [`DesiredState`]).
///
/// `message` is the encoding of an unsigned message of the same envelope; the signature
/// covers `b"brume-hub-message-v1\0" || topic || b"\0" || message` (computed by the
/// `brume-signing` crate), so a signed message is valid only on the topic it was published
/// on: an acknowledgement for one agent cannot be replayed to another, nor an ack as a
/// desired state. Replaying a message on its own topic only repeats what the hub said
/// (batches stay committed; an older desired-state generation is ignored).
///
/// Agents that pin hub keys (`forward.hub_keys`) act only on signed messages whose key and
/// signature they verify; the others read `message` unverified. Hubs sign only when they
/// have a key (`mqtt.signing_key`), so agents older than this variant keep working until
/// it is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedV1 {
    /// The unsigned message's encoding.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
    /// The signing key's id: the first 8 bytes of sha256 of its public key.
    pub key_id: [u8; 8],
    /// The 64-byte ed25519 signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The kinds of message a hub sends to agents; each has its own envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubKind {
    /// [`HubMessage`] on [`topics::acks`].
    Ack,
    /// [`HubAnnouncement`] on [`topics::HUB_ONLINE`].
    Announcement,
    /// [`DesiredState`] on [`topics::desired`].
    Desired,
}

impl HubKind {
    /// A short name, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HubKind::Ack => "ack",
            HubKind::Announcement => "announcement",
            HubKind::Desired => "desired",
        }
    }

    /// Encodes `signed` in this kind's envelope.
    pub fn seal(self, signed: SignedV1) -> Vec<u8> {
        match self {
            HubKind::Ack => HubMessage::SignedV1(signed).encode(),
            HubKind::Announcement => HubAnnouncement::SignedV1(signed).encode(),
            HubKind::Desired => fleet::DesiredState::SignedV1(signed).encode(),
        }
    }

    /// The signed message in `bytes`, if it is one (`None`: an unsigned message, not
    /// decoded here). Decoding the envelope is all this does; nothing is verified.
    pub fn signed_part(self, bytes: &[u8]) -> Result<Option<SignedV1>, DecodeError> {
        // The variant index leads the encoding: only a signed message is decoded here.
        let signed_index = match self {
            HubKind::Ack | HubKind::Announcement => 1,
            HubKind::Desired => 2,
        };
        if bytes.first() != Some(&signed_index) {
            return Ok(None);
        }
        let s = match self {
            HubKind::Ack => match decode_exact(bytes)? {
                HubMessage::SignedV1(s) => s,
                HubMessage::AckV1(_) => unreachable!("variant index checked"),
            },
            HubKind::Announcement => match decode_exact(bytes)? {
                HubAnnouncement::SignedV1(s) => s,
                HubAnnouncement::OnlineV1(_) => unreachable!("variant index checked"),
            },
            HubKind::Desired => match decode_exact(bytes)? {
                fleet::DesiredState::SignedV1(s) => s,
                _ => unreachable!("variant index checked"),
            },
        };
        if s.signature.len() != 64 {
            return Err(invalid("hub signature", format!("{} bytes, expected 64", s.signature.len())));
        }
        if s.message.first() == Some(&signed_index) {
            return Err(invalid("signed hub message", "a signed message inside a signed message"));
        }
        Ok(Some(s))
    }
}

/// What hubs announce to every agent on [`topics::HUB_ONLINE`] (retained). The variant
/// index is the wire version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubAnnouncement {
    /// Version 1: a hub has (re)subscribed to batches.
    OnlineV1(HubOnlineV1),
    /// A message of this envelope (an `OnlineV1`) signed by the hub: see [`SignedV1`].
    SignedV1(SignedV1),
}

/// A hub is subscribed again after (re)connecting to the broker. Batches published while
/// no hub was subscribed were dropped by the broker, so an agent re-sends its batches in
/// flight at once instead of waiting for `ack_timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubOnlineV1 {
    /// When the hub's subscription was confirmed, ms since the Unix epoch (hub clock):
    /// tells one announcement from the next.
    pub subscribed_ms: i64,
}

impl HubAnnouncement {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_exact(bytes)
    }
}

/// Longest free-text label in a presence message (version, module name, error), bytes.
pub const MAX_STATUS_LABEL: usize = 256;
/// Most modules one presence message lists.
pub const MAX_STATUS_MODULES: usize = 64;

/// An agent's presence and health, published retained on [`topics::status`] every
/// heartbeat interval and, with `online = false`, as its MQTT last will (so the broker
/// announces an agent that vanished) and on a clean shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStatus {
    /// Version 1.
    V1(StatusV1),
    /// Version 2: version 1's fields, then what version 2 adds. Hubs decode both; agents
    /// send version 2, so upgrade hubs before agents (an older hub ignores a version 2
    /// message as malformed until then, and shows such an agent as not reporting).
    V2(StatusV1, StatusExtV2),
}

/// What version 2 presence messages add to version 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusExtV2 {
    /// When the oldest batch waiting for the hub's acknowledgement was cut, ms since the
    /// Unix epoch (agent clock); `None` when the outbox is empty. The agent's backlog age
    /// is the time since then.
    pub oldest_outbox_ms: Option<i64>,
}

/// Version 1 presence message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusV1 {
    /// The agent's id. Must match the id in the topic.
    pub agent_id: String,
    /// False in the last will and on shutdown.
    pub online: bool,
    /// Agent software version.
    pub version: String,
    /// When the agent process started, ms since the Unix epoch.
    pub started_ms: i64,
    /// When this message was made, ms since the Unix epoch (orders messages).
    pub sent_ms: i64,
    /// Seconds between heartbeats: a hub considers the agent gone after missing three.
    pub heartbeat_s: u32,
    /// Readings in the local store.
    pub store_readings: u64,
    /// Batches waiting for the hub's acknowledgement, and their readings.
    pub outbox_batches: u64,
    /// Readings in those batches.
    pub outbox_readings: u64,
    /// The agent's modules.
    pub modules: Vec<ModuleHealth>,
    /// Operator-defined labels (`site = "plant-a"`), for filtering fleets at the hub.
    pub labels: Vec<(String, String)>,
}

/// One module in a presence message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleHealth {
    /// Module name.
    pub name: String,
    /// Hex sha256 of the running build, empty if none is loaded.
    pub sha256: String,
    /// Running (false: failed to load, or disabled after repeated failures).
    pub enabled: bool,
    /// Batches that failed since the agent started.
    pub batches_failed: u64,
    /// The last error, empty if none.
    pub last_error: String,
}

impl AgentStatus {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes and validates a message of any version, returning version 1's fields.
    pub fn decode(bytes: &[u8]) -> Result<StatusV1, DecodeError> {
        Self::decode_full(bytes).map(|(s, _)| s)
    }

    /// Decodes and validates a message of any version: version 1's fields and the later
    /// versions' additions (their defaults for a version 1 message).
    pub fn decode_full(bytes: &[u8]) -> Result<(StatusV1, StatusExtV2), DecodeError> {
        let (s, ext) = match decode_exact(bytes)? {
            AgentStatus::V1(s) => (s, StatusExtV2::default()),
            AgentStatus::V2(s, ext) => (s, ext),
        };
        validate_agent_id(&s.agent_id)?;
        if s.modules.len() > MAX_STATUS_MODULES {
            return Err(invalid("status modules", format!("{} listed, at most {MAX_STATUS_MODULES}", s.modules.len())));
        }
        if s.labels.len() > MAX_STATUS_MODULES {
            return Err(invalid("status labels", format!("{} given, at most {MAX_STATUS_MODULES}", s.labels.len())));
        }
        let labels = std::iter::once(&s.version)
            .chain(s.modules.iter().flat_map(|m| [&m.name, &m.sha256, &m.last_error]))
            .chain(s.labels.iter().flat_map(|(k, v)| [k, v]));
        for l in labels {
            if l.len() > MAX_STATUS_LABEL {
                return Err(invalid("status label", format!("{} bytes, at most {MAX_STATUS_LABEL}", l.len())));
            }
        }
        Ok((s, ext))
    }
}

/// The identity of a batch: the hub stores each `(agent_id, epoch, seq)` once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    /// Agent id, as the batch claims it (not validated by [`AgentMessage::peek_key`]).
    pub agent_id: String,
    /// The agent's store epoch.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u64,
}

/// Why a message or fields blob was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// Not valid postcard for the expected type, or an unknown version variant.
    #[error("malformed message: {0} (unknown protocol version or corrupt bytes)")]
    Postcard(#[from] postcard::Error),
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The message is larger than the protocol allows.
    #[error("message of {0} bytes exceeds the limit of {max} bytes", max = limits::MAX_MESSAGE_BYTES)]
    TooLarge(usize),
    /// A name or value breaks a limit.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What was invalid (`stream name`, `field name`, …).
        what: &'static str,
        /// Why, for the operator.
        why: String,
    },
}

fn invalid(what: &'static str, why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid { what, why: why.into() }
}

/// The one rule for names that agents and hubs store as text (stream names, field names):
/// 1 to `max` bytes of UTF-8 with no control character (U+0000–U+001F, U+007F–U+009F).
///
/// Control characters are refused because the stores cannot all hold them (PostgreSQL
/// `text` refuses U+0000) and because they make names that print the same but differ. A
/// name that passes here can be stored by every backend, so a batch an agent cuts from
/// readings it accepted is never refused by a hub for its names.
fn validate_name(what: &'static str, name: &str, max: usize) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(invalid(what, "\"\" is empty; a name needs at least one character"));
    }
    if name.len() > max {
        return Err(invalid(what, format!("{:?}…: {} bytes, limit {max}", truncate(name, 32), name.len())));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(invalid(
            what,
            format!(
                "{name:?} contains the control character U+{:04X}; only printable characters are allowed",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks a stream name: non-empty, at most [`limits::MAX_STREAM_NAME`] bytes, no control
/// characters and no MQTT wildcards.
pub fn validate_stream_name(name: &str) -> Result<(), DecodeError> {
    validate_name("stream name", name, limits::MAX_STREAM_NAME)?;
    if name.contains(['+', '#']) {
        return Err(invalid("stream name", format!("{name:?} contains an MQTT wildcard ('+' or '#')")));
    }
    Ok(())
}

/// Checks a field name: non-empty, at most [`limits::MAX_FIELD_NAME`] bytes, no control
/// characters.
pub fn validate_field_name(name: &str) -> Result<(), DecodeError> {
    validate_name("field name", name, limits::MAX_FIELD_NAME)
}

/// Checks a reading timestamp: within [`limits::MIN_TS_NS`]..[`limits::MAX_TS_NS`]
/// (2000-01-01 to 2200-01-01). Agents refuse other timestamps at ingest and hubs refuse
/// them in batches, so no batch an agent cuts is ever refused for its timestamps.
pub fn validate_timestamp(ts_ns: i64) -> Result<(), DecodeError> {
    if (limits::MIN_TS_NS..limits::MAX_TS_NS).contains(&ts_ns) {
        Ok(())
    } else {
        Err(invalid("timestamp", format!("{ts_ns} ns is outside 2000-01-01T00:00:00Z..2200-01-01T00:00:00Z")))
    }
}

/// Checks an agent id: 1 to [`limits::MAX_AGENT_ID`] bytes of `[A-Za-z0-9_.-]`, so it is
/// always a single, literal MQTT topic level.
pub fn validate_agent_id(id: &str) -> Result<(), DecodeError> {
    if id.is_empty() || id.len() > limits::MAX_AGENT_ID {
        return Err(invalid("agent id", format!("{id:?}: must be 1 to {} bytes", limits::MAX_AGENT_ID)));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(invalid("agent id", format!("{id:?}: only letters, digits, '_', '.' and '-' are allowed")));
    }
    Ok(())
}

fn validate_fields(fields: &[Field]) -> Result<(), DecodeError> {
    if fields.is_empty() {
        return Err(invalid("fields", "a reading needs at least one field"));
    }
    if fields.len() > limits::MAX_FIELDS {
        return Err(invalid("fields", format!("{} fields, limit {}", fields.len(), limits::MAX_FIELDS)));
    }
    for f in fields {
        validate_field_name(&f.name)?;
        match &f.value {
            Value::Str(s) if s.len() > limits::MAX_STRING_VALUE => {
                return Err(invalid(
                    "field value",
                    format!("string field {:?} is {} bytes, limit {}", f.name, s.len(), limits::MAX_STRING_VALUE),
                ));
            }
            Value::F64(v) if !v.is_finite() => {
                return Err(invalid(
                    "field value",
                    format!("field {:?} is {v}, only finite numbers are allowed", f.name),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    if bytes.len() > limits::MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (msg, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

impl AgentMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes and validates a message: names, limits and every reading's fields.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg: AgentMessage = decode_exact(bytes)?;
        let (agent_id, seq, streams, losses) = match &msg {
            AgentMessage::BatchV1(b) => (&b.agent_id, b.seq, &b.streams, &b.losses),
            AgentMessage::BatchV2(b) | AgentMessage::BatchV3(b) => {
                validate_lineage(b)?;
                (&b.agent_id, b.seq, &b.streams, &b.losses)
            }
        };
        validate_agent_id(agent_id)?;
        if seq == 0 {
            return Err(invalid("batch sequence", "sequence numbers start at 1"));
        }
        let variants = matches!(msg, AgentMessage::BatchV3(_));
        for (i, chunk) in streams.iter().enumerate() {
            if variants {
                if let Some(build) = validate_variant_name(&chunk.stream)? {
                    let AgentMessage::BatchV3(b) = &msg else { unreachable!("variants only in V3") };
                    if b.module_of(i).map(|m| m.sha256) != Some(build) {
                        return Err(invalid(
                            "stream name",
                            format!(
                                "{:?}: a re-processed variant's chunk must have lineage naming that build",
                                chunk.stream
                            ),
                        ));
                    }
                }
            } else {
                validate_stream_name(&chunk.stream)?;
            }
            for p in &chunk.points {
                p.fields.decode()?;
            }
        }
        for l in losses {
            if variants {
                validate_variant_name(&l.stream)?;
            } else {
                validate_stream_name(&l.stream)?;
            }
        }
        Ok(msg)
    }

    /// Reads only a batch's identity (agent id, epoch, seq) from its envelope, without
    /// validating names, fields, limits or lineage: for a hub that must tell the sender
    /// which batch it refused (and quarantine its bytes) when [`AgentMessage::decode`]
    /// fails on the content. Fails only if the bytes are not a batch envelope at all.
    pub fn peek_key(bytes: &[u8]) -> Result<BatchKey, DecodeError> {
        let msg: AgentMessage = decode_exact(bytes)?;
        let (agent_id, epoch, seq) = match msg {
            AgentMessage::BatchV1(b) => (b.agent_id, b.epoch, b.seq),
            AgentMessage::BatchV2(b) | AgentMessage::BatchV3(b) => (b.agent_id, b.epoch, b.seq),
        };
        Ok(BatchKey { agent_id, epoch, seq })
    }

    /// Decodes a batch of any version as the current [`Batch`].
    pub fn decode_batch(bytes: &[u8]) -> Result<Batch, DecodeError> {
        Ok(match Self::decode(bytes)? {
            AgentMessage::BatchV1(b) => b.into(),
            AgentMessage::BatchV2(b) | AgentMessage::BatchV3(b) => b,
        })
    }

    /// The message for a batch: version 2, or version 3 if it carries re-processed
    /// variants (so hubs that predate them keep taking an agent's other batches).
    pub fn for_batch(b: Batch) -> AgentMessage {
        let variant = |s: &str| s.contains(VARIANT_SEP);
        if b.streams.iter().any(|c| variant(&c.stream)) || b.losses.iter().any(|l| variant(&l.stream)) {
            AgentMessage::BatchV3(b)
        } else {
            AgentMessage::BatchV2(b)
        }
    }
}

fn validate_lineage(b: &BatchV2) -> Result<(), DecodeError> {
    let mut prev: Option<u32> = None;
    for l in &b.lineage {
        if l.chunk as usize >= b.streams.len() {
            return Err(invalid("lineage", format!("chunk {} of a batch with {} chunks", l.chunk, b.streams.len())));
        }
        if prev.is_some_and(|p| p >= l.chunk) {
            return Err(invalid("lineage", "chunk indices must be strictly ascending"));
        }
        prev = Some(l.chunk);
        for (what, s) in [("module name", &l.module.name), ("module version", &l.module.version)] {
            if s.len() > MAX_MODULE_LABEL || s.chars().any(char::is_control) {
                return Err(invalid(what, format!("{s:?}: at most {MAX_MODULE_LABEL} bytes, no control characters")));
            }
        }
        if l.module.name.is_empty() {
            return Err(invalid("module name", "is empty"));
        }
    }
    Ok(())
}

impl HubMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_exact(bytes)
    }
}

/// MQTT topics shared by agents and hubs. `{agent}` is the agent id.
pub mod topics {
    /// Prefix of every Brume topic.
    pub const ROOT: &str = "brume/v1/agents";

    /// Where an agent publishes its batches.
    pub fn batches(agent_id: &str) -> String {
        format!("{ROOT}/{agent_id}/batches")
    }

    /// Where the hub publishes acknowledgements for one agent.
    pub fn acks(agent_id: &str) -> String {
        format!("{ROOT}/{agent_id}/acks")
    }

    /// Where an agent publishes its presence (retained, and as its last will).
    pub fn status(agent_id: &str) -> String {
        format!("{ROOT}/{agent_id}/status")
    }

    /// Where the hub publishes (retained) the modules one agent should run
    /// (`DesiredState`).
    pub fn desired(agent_id: &str) -> String {
        format!("{ROOT}/{agent_id}/desired")
    }

    /// Where an agent publishes (retained) what its modules are doing (`AgentReport`).
    pub fn report(agent_id: &str) -> String {
        format!("{ROOT}/{agent_id}/report")
    }

    /// The filter a hub subscribes to for all agents' reports.
    pub const ALL_REPORTS: &str = "brume/v1/agents/+/report";

    /// The filter a hub subscribes to for all agents' batches.
    pub const ALL_BATCHES: &str = "brume/v1/agents/+/batches";

    /// The filter a hub subscribes to for all agents' presence.
    pub const ALL_STATUS: &str = "brume/v1/agents/+/status";

    /// Where hubs announce (retained) that they are subscribed after a (re)connect
    /// (`HubAnnouncement`); every agent subscribes.
    pub const HUB_ONLINE: &str = "brume/v1/hub/online";

    /// Checks an MQTT-style pattern over stream names: `+` is one whole level, `#` a
    /// whole last level matching any number of levels (including none).
    pub fn validate_pattern(p: &str) -> Result<(), String> {
        if p.is_empty() {
            return Err("pattern is empty".into());
        }
        let levels: Vec<&str> = p.split('/').collect();
        for (i, l) in levels.iter().enumerate() {
            if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
                return Err(format!("{p:?}: '#' must be a whole level and the last one"));
            }
            if l.contains('+') && *l != "+" {
                return Err(format!("{p:?}: '+' must be a whole level"));
            }
        }
        Ok(())
    }

    /// MQTT topic-filter matching: `+` matches one level, a final `#` any number
    /// (including zero).
    pub fn pattern_matches(pattern: &str, name: &str) -> bool {
        let mut p = pattern.split('/');
        let mut n = name.split('/');
        loop {
            match (p.next(), n.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Extracts the agent id from a report topic.
    pub fn agent_of_report_topic(topic: &str) -> Option<&str> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let (agent, tail) = rest.split_once('/')?;
        (tail == "report" && !agent.is_empty()).then_some(agent)
    }

    /// Extracts the agent id from a status topic.
    pub fn agent_of_status_topic(topic: &str) -> Option<&str> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let (agent, tail) = rest.split_once('/')?;
        (tail == "status" && !agent.is_empty()).then_some(agent)
    }

    /// Extracts the agent id from a batch topic.
    pub fn agent_of_batch_topic(topic: &str) -> Option<&str> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let (agent, tail) = rest.split_once('/')?;
        (tail == "batches" && !agent.is_empty()).then_some(agent)
    }
}

mod fleet;
pub use fleet::*;

#[cfg(test)]
mod tests;
