//! Sensor payloads → [`Reading`]s.
//!
//! The agent accepts readings as MQTT messages ([`parse_mqtt`]) and as HTTP ingest bodies
//! ([`parse_http`]). Both turn a payload into a `Vec<Reading>`, all or nothing: one bad
//! reading rejects the whole payload, with a [`PayloadError`] that says what was wrong and
//! where, and whose [`PayloadError::reason`] is a short label for metrics.
//!
//! ## Payload formats
//!
//! **MQTT.** The topic is mapped to a stream, and the format is sniffed from the payload's
//! first character after leading whitespace:
//!
//! * `{` — one JSON object: one reading on the topic's stream.
//! * `[` — a JSON array of objects: one reading per element, all on the topic's stream.
//!   A `"stream"` key is an ordinary field here: on MQTT the topic decides the stream.
//! * a bare JSON number or `true` / `false` — one reading with the single field `value`,
//!   timestamped on arrival.
//! * anything else — InfluxDB line protocol, one reading per line. The stream of each
//!   reading is the line's measurement name, not the topic's stream.
//!
//! **HTTP.** The `Content-Type` decides (parameters such as `; charset=utf-8` are ignored):
//!
//! * `application/json` — a JSON array of objects, or a single object. Each object names
//!   its stream with a `"stream"` key (a string), which is removed from the fields. An
//!   object without one goes to the default stream (the `?stream=` query parameter); with
//!   neither, the body is rejected.
//! * `text/plain` or no content type — line protocol; the stream is the measurement name
//!   (`?stream=` is ignored).
//! * any other content type is rejected (`unsupported_content_type`).
//!
//! ## Limits
//!
//! * A payload larger than `max_payload_bytes` (default 256 KiB) is rejected before
//!   anything else is looked at (`too_large`).
//! * It must be UTF-8 (`not_utf8`, with the byte offset of the first bad byte), and hold
//!   something other than whitespace (`empty`). An empty JSON array, or line protocol with
//!   only comments and blank lines, is `empty` too.
//! * At most `max_readings` readings (default 100 000) per payload (`too_many_readings`).
//! * Every reading obeys the protocol's limits (`brume_protocol::limits`): at least one and
//!   at most 256 fields, field names of 1 to 128 bytes without control characters
//!   (U+0000–U+001F, U+007F–U+009F), strings of at most 16 KiB, finite
//!   numbers, and a valid stream name (non-empty, at most 256 bytes, no control characters,
//!   no MQTT wildcards `+` `#`). Field problems are `bad_field`, stream problems
//!   `bad_stream`.
//!
//! ## JSON objects
//!
//! * Every key except the timestamp key (`timestamp_field`, default `ts`) becomes a field.
//! * Numbers become floats (`F64`), except integers beyond ±2^53 — which a float cannot
//!   hold exactly — that fit a signed 64-bit integer: those become `I64`. Strings become
//!   `Str`, booleans `Bool`.
//! * Nested objects are flattened with `.`: `{"a":{"b":1}}` is the field `a.b`.
//! * Arrays become one field per element, named by index: `{"v":[1,2]}` is `v.0` and
//!   `v.1`. An array directly inside an array (`{"v":[[1]]}`) is rejected (`bad_field`).
//! * `null` values are skipped (an array keeps the other elements' indexes). An object left
//!   with no field at all is rejected (`bad_field`), and so is one whose flattened names
//!   collide (`{"a.b":1,"a":{"b":2}}`).
//! * Field order within a reading is not significant.
//!
//! ## Timestamps
//!
//! * JSON: the timestamp key holds either a number in `timestamp_unit` (`s`, `ms` (the
//!   default), `us` or `ns`; fractions are allowed, e.g. `1700000000.5` seconds) or an
//!   RFC 3339 string (`2023-11-14T22:13:20.5Z`, `+02:00`-style offsets, and also
//!   `2023-11-14 22:13:20`, read as UTC). Without the key, the reading is timestamped on
//!   arrival.
//! * Line protocol: the optional trailing timestamp is in nanoseconds; without it, the
//!   arrival time.
//! * Anything else (another JSON type, an unparsable string) or a time outside
//!   2000-01-01T00:00:00Z..2200-01-01T00:00:00Z is rejected (`bad_timestamp`), naming the
//!   key or line: earlier times are nearly always a unit mistake (seconds read as
//!   milliseconds) or a device whose clock was never set, and the hub refuses them too.
//!
//! ## Line protocol
//!
//! Parsed with the `influxdb-line-protocol` crate, so the syntax (escaping, quoted strings,
//! `i` / `u` suffixes, `t` / `false` booleans, …) is InfluxDB's.
//!
//! * Stream = measurement name. Tags become string fields named after the tag key; a tag
//!   and a field (or two fields) with the same name are rejected.
//! * Field values: float → `F64`, integer (`12i`) → `I64`, unsigned (`12u`) → `I64` if it
//!   fits (else rejected), string → `Str`, boolean → `Bool`.
//! * Blank lines and comment lines (`#`) are skipped; `\r\n` line ends are accepted.
//! * Errors name the 1-based line (`line 3: …`) and are `bad_line_protocol` when the line
//!   does not parse.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::time::UNIX_EPOCH;

use brume_protocol::{Field, Reading, Value, limits, validate_stream_name};
use influxdb_line_protocol::{FieldValue, ParsedLine};
use serde_json::{Map, Number, Value as Json};

/// The range of timestamps a reading can have, for error messages.
const TIME_RANGE: &str = "2000-01-01T00:00:00Z..2200-01-01T00:00:00Z";

/// How payloads are read: timestamps and size limits. Part of the agent's TOML config;
/// every key is optional.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PayloadConfig {
    /// JSON key holding a reading's timestamp; a payload without it is timestamped on
    /// arrival. Default `"ts"`.
    pub timestamp_field: String,
    /// Unit of numeric JSON timestamps. Default `"ms"`. RFC 3339 strings are always
    /// accepted too.
    pub timestamp_unit: TimestampUnit,
    /// Largest accepted payload, in bytes. Default 256 KiB.
    pub max_payload_bytes: usize,
    /// Most readings in one payload or body. Default 100 000.
    pub max_readings: usize,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        PayloadConfig {
            timestamp_field: "ts".to_owned(),
            timestamp_unit: TimestampUnit::default(),
            max_payload_bytes: 256 * 1024,
            max_readings: 100_000,
        }
    }
}

/// Unit of numeric JSON timestamps. In the config: `"s"`, `"ms"`, `"us"` or `"ns"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    /// Seconds since the Unix epoch.
    S,
    /// Milliseconds since the Unix epoch (the default).
    #[default]
    Ms,
    /// Microseconds since the Unix epoch.
    Us,
    /// Nanoseconds since the Unix epoch.
    Ns,
}

impl TimestampUnit {
    /// Nanoseconds in one unit.
    pub fn nanos(self) -> i64 {
        match self {
            TimestampUnit::S => 1_000_000_000,
            TimestampUnit::Ms => 1_000_000,
            TimestampUnit::Us => 1_000,
            TimestampUnit::Ns => 1,
        }
    }

    /// The unit's config name: `s`, `ms`, `us` or `ns`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampUnit::S => "s",
            TimestampUnit::Ms => "ms",
            TimestampUnit::Us => "us",
            TimestampUnit::Ns => "ns",
        }
    }
}

impl fmt::Display for TimestampUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in a payload an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The payload as a whole (a single JSON object or value).
    Payload,
    /// An element of a top-level JSON array, counted from 0.
    Element(usize),
    /// A line of line protocol, counted from 1.
    Line(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Payload => f.write_str("payload"),
            Location::Element(i) => write!(f, "element {i}"),
            Location::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// Why a payload was rejected. The message says what was wrong and where (array element,
/// line, field or key name, byte offset); [`PayloadError::reason`] is a stable label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    /// The payload is larger than `max_payload_bytes`.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the payload, in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The payload is not UTF-8.
    #[error("payload is not valid UTF-8 (first bad byte at offset {offset})")]
    NotUtf8 {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The payload is empty or whitespace, or holds no reading (`[]`, only comments).
    #[error("payload is empty or holds no readings")]
    Empty,
    /// The HTTP content type is neither JSON nor line protocol.
    #[error("unsupported content type {0:?}: use application/json or text/plain (line protocol)")]
    UnsupportedContentType(String),
    /// Malformed JSON, or JSON of the wrong shape.
    #[error("{at}: invalid JSON: {msg}")]
    BadJson {
        /// Where.
        at: Location,
        /// What is wrong (serde_json's message includes line and column).
        msg: String,
    },
    /// A line that is not valid line protocol.
    #[error("line {line}: invalid line protocol: {msg}")]
    BadLineProtocol {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A timestamp of the wrong type, unparsable, or out of range.
    #[error("{at}: {msg}")]
    BadTimestamp {
        /// Where.
        at: Location,
        /// What is wrong, naming the key.
        msg: String,
    },
    /// A field the protocol refuses, or a reading without fields.
    #[error("{at}: {msg}")]
    BadField {
        /// Where.
        at: Location,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// A missing or invalid stream name.
    #[error("{at}: {msg}")]
    BadStream {
        /// Where.
        at: Location,
        /// What is wrong, naming the stream.
        msg: String,
    },
    /// More readings than `max_readings`.
    #[error("payload holds more than {max} readings")]
    TooManyReadings {
        /// The configured limit.
        max: usize,
    },
}

impl PayloadError {
    /// Short, stable label for metrics: `too_large`, `not_utf8`, `empty`,
    /// `unsupported_content_type`, `bad_json`, `bad_line_protocol`, `bad_timestamp`,
    /// `bad_field`, `bad_stream` or `too_many_readings`.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::TooLarge { .. } => "too_large",
            PayloadError::NotUtf8 { .. } => "not_utf8",
            PayloadError::Empty => "empty",
            PayloadError::UnsupportedContentType(_) => "unsupported_content_type",
            PayloadError::BadJson { .. } => "bad_json",
            PayloadError::BadLineProtocol { .. } => "bad_line_protocol",
            PayloadError::BadTimestamp { .. } => "bad_timestamp",
            PayloadError::BadField { .. } => "bad_field",
            PayloadError::BadStream { .. } => "bad_stream",
            PayloadError::TooManyReadings { .. } => "too_many_readings",
        }
    }
}

/// Parses the payload of an MQTT PUBLISH on a topic mapped to `stream`.
///
/// JSON readings go to `stream`; line-protocol readings go to their measurement's stream.
/// `now_ns` (nanoseconds since the Unix epoch) timestamps readings that carry no
/// timestamp. See the [module documentation](self) for the formats and rules.
pub fn parse_mqtt(
    stream: &str,
    payload: &[u8],
    now_ns: i64,
    cfg: &PayloadConfig,
) -> Result<Vec<Reading>, PayloadError> {
    check_size(payload, cfg)?;
    let text = decode_text(payload)?;
    let trimmed = text.trim();
    if trimmed.starts_with(['{', '[']) {
        json_readings(text, now_ns, cfg, |_, _| Ok(stream.to_owned()))
    } else if let Some(value) = bare_value(trimmed) {
        let field = Field { name: "value".to_owned(), value };
        Ok(vec![build_reading(stream.to_owned(), now_ns, &[field], Location::Payload)?])
    } else {
        line_protocol_readings(text, now_ns, cfg)
    }
}

/// Parses the body of an HTTP ingest POST.
///
/// `content_type` is the request's `Content-Type` header: `application/json` (readings name
/// their stream with a `"stream"` key, `default_stream` — the `?stream=` query parameter —
/// serves those that do not), or `text/plain` / absent for line protocol (the stream is the
/// measurement name). `now_ns` timestamps readings that carry no timestamp. See the
/// [module documentation](self) for the formats and rules.
pub fn parse_http(
    default_stream: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    now_ns: i64,
    cfg: &PayloadConfig,
) -> Result<Vec<Reading>, PayloadError> {
    check_size(body, cfg)?;
    let json = match content_type.map(|ct| ct.split(';').next().unwrap_or_default().trim()) {
        None | Some("") => false,
        Some(mime) if mime.eq_ignore_ascii_case("application/json") => true,
        Some(mime) if mime.eq_ignore_ascii_case("text/plain") => false,
        Some(_) => return Err(PayloadError::UnsupportedContentType(content_type.unwrap_or_default().to_owned())),
    };
    let text = decode_text(body)?;
    if json {
        json_readings(text, now_ns, cfg, |obj, at| take_stream(obj, at, default_stream))
    } else {
        line_protocol_readings(text, now_ns, cfg)
    }
}

fn check_size(payload: &[u8], cfg: &PayloadConfig) -> Result<(), PayloadError> {
    if payload.len() > cfg.max_payload_bytes {
        return Err(PayloadError::TooLarge { size: payload.len(), max: cfg.max_payload_bytes });
    }
    Ok(())
}

/// The payload as text that is not blank.
fn decode_text(payload: &[u8]) -> Result<&str, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|e| PayloadError::NotUtf8 { offset: e.valid_up_to() })?;
    if text.trim().is_empty() {
        return Err(PayloadError::Empty);
    }
    Ok(text)
}

/// Whether a timestamp is one the protocol accepts (its one rule:
/// [`brume_protocol::validate_timestamp`]).
fn in_range(ts_ns: i64) -> bool {
    brume_protocol::validate_timestamp(ts_ns).is_ok()
}

/// Builds a reading, mapping the protocol's validation errors to ours.
fn build_reading(stream: String, ts_ns: i64, fields: &[Field], at: Location) -> Result<Reading, PayloadError> {
    validate_stream_name(&stream).map_err(|e| PayloadError::BadStream { at, msg: e.to_string() })?;
    if !in_range(ts_ns) {
        // Only arrival times get here (parsed timestamps were checked with their key or
        // line): the device's clock is wrong.
        let msg = format!("arrival time {ts_ns} ns is outside {TIME_RANGE}: is the device clock set?");
        return Err(PayloadError::BadTimestamp { at, msg });
    }
    Reading::new(stream, ts_ns, fields).map_err(|e| PayloadError::BadField { at, msg: e.to_string() })
}

/// The first field name that occurs twice.
fn find_duplicate(fields: &[Field]) -> Option<&str> {
    let mut seen = HashSet::with_capacity(fields.len());
    fields.iter().map(|f| f.name.as_str()).find(|name| !seen.insert(*name))
}

// ---------------------------------------------------------------------------------------
// JSON

/// Parses a JSON object or array of objects. `stream_of` picks (and may remove) each
/// object's stream.
fn json_readings(
    text: &str,
    now_ns: i64,
    cfg: &PayloadConfig,
    mut stream_of: impl FnMut(&mut Map<String, Json>, Location) -> Result<String, PayloadError>,
) -> Result<Vec<Reading>, PayloadError> {
    let json: Json =
        serde_json::from_str(text).map_err(|e| PayloadError::BadJson { at: Location::Payload, msg: e.to_string() })?;
    let items = match json {
        Json::Object(obj) => return Ok(vec![object_reading(obj, Location::Payload, now_ns, cfg, &mut stream_of)?]),
        Json::Array(items) => items,
        other => {
            return Err(PayloadError::BadJson {
                at: Location::Payload,
                msg: format!("expected an object or an array of objects, found {}", kind(&other)),
            });
        }
    };
    if items.is_empty() {
        return Err(PayloadError::Empty);
    }
    if items.len() > cfg.max_readings {
        return Err(PayloadError::TooManyReadings { max: cfg.max_readings });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = Location::Element(i);
            match item {
                Json::Object(obj) => object_reading(obj, at, now_ns, cfg, &mut stream_of),
                other => Err(PayloadError::BadJson { at, msg: format!("expected an object, found {}", kind(&other)) }),
            }
        })
        .collect()
}

/// One JSON object → one reading.
fn object_reading(
    mut obj: Map<String, Json>,
    at: Location,
    now_ns: i64,
    cfg: &PayloadConfig,
    stream_of: &mut impl FnMut(&mut Map<String, Json>, Location) -> Result<String, PayloadError>,
) -> Result<Reading, PayloadError> {
    let stream = stream_of(&mut obj, at)?;
    let ts_ns = match obj.remove(&cfg.timestamp_field) {
        None => now_ns,
        Some(ts) => json_timestamp(&ts, cfg.timestamp_unit).map_err(|why| PayloadError::BadTimestamp {
            at,
            msg: format!("timestamp field {:?}: {why}", cfg.timestamp_field),
        })?,
    };
    let mut fields = Vec::with_capacity(obj.len());
    let mut name = String::new();
    for (key, value) in obj {
        name.clear();
        name.push_str(&key);
        flatten(&mut name, value, &mut fields).map_err(|msg| PayloadError::BadField { at, msg })?;
    }
    if fields.is_empty() {
        return Err(PayloadError::BadField { at, msg: "no fields (null values are skipped)".to_owned() });
    }
    if let Some(dup) = find_duplicate(&fields) {
        return Err(PayloadError::BadField { at, msg: format!("field {dup:?} occurs twice after flattening") });
    }
    build_reading(stream, ts_ns, &fields, at)
}

/// Appends the fields of `value`, whose (dotted) name is `name`, to `out`. `name` is left
/// as it was given. Errors name the field.
fn flatten(name: &mut String, value: Json, out: &mut Vec<Field>) -> Result<(), String> {
    let value = match value {
        Json::Null => return Ok(()),
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => number_value(&n),
        Json::String(s) => Value::Str(s),
        Json::Object(obj) => {
            let len = name.len();
            for (key, value) in obj {
                name.push('.');
                name.push_str(&key);
                flatten(name, value, out)?;
                name.truncate(len);
            }
            return Ok(());
        }
        Json::Array(items) => {
            let len = name.len();
            for (i, item) in items.into_iter().enumerate() {
                if item.is_array() {
                    return Err(format!("field {name:?}: nested arrays are not supported"));
                }
                write!(name, ".{i}").expect("writing to a String cannot fail");
                flatten(name, item, out)?;
                name.truncate(len);
            }
            return Ok(());
        }
    };
    if out.len() == limits::MAX_FIELDS {
        return Err(format!("more than {} fields (at {name:?})", limits::MAX_FIELDS));
    }
    out.push(Field { name: name.clone(), value });
    Ok(())
}

/// A JSON number as a field value: `F64`, unless it is an integer a float cannot hold
/// exactly (beyond ±2^53) that fits `I64`.
fn number_value(n: &Number) -> Value {
    const EXACT: u64 = 1 << 53;
    match n.as_i64() {
        Some(i) if i.unsigned_abs() > EXACT => Value::I64(i),
        // Without serde_json's `arbitrary_precision`, every number has an f64 value.
        _ => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// A bare JSON number or boolean (an MQTT payload that is just a value).
fn bare_value(text: &str) -> Option<Value> {
    match text {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        _ if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            serde_json::from_str::<Number>(text).ok().map(|n| number_value(&n))
        }
        _ => None,
    }
}

/// JSON type name for messages.
fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Removes and returns an HTTP object's `"stream"`, or falls back to the default stream.
fn take_stream(obj: &mut Map<String, Json>, at: Location, default: Option<&str>) -> Result<String, PayloadError> {
    match obj.remove("stream") {
        Some(Json::String(s)) => Ok(s),
        Some(other) => {
            Err(PayloadError::BadStream { at, msg: format!("\"stream\" must be a string, found {}", kind(&other)) })
        }
        None => default.map(str::to_owned).ok_or_else(|| PayloadError::BadStream {
            at,
            msg: "no \"stream\" key and no default stream (?stream=)".to_owned(),
        }),
    }
}

/// A JSON timestamp in nanoseconds since the epoch. The error says why, without the key.
fn json_timestamp(ts: &Json, unit: TimestampUnit) -> Result<i64, String> {
    match ts {
        Json::Number(n) => number_timestamp(n, unit),
        Json::String(s) => rfc3339_timestamp(s),
        other => Err(format!("expected a number ({unit}) or an RFC 3339 string, found {}", kind(other))),
    }
}

fn number_timestamp(n: &Number, unit: TimestampUnit) -> Result<i64, String> {
    let ns = match n.as_i64() {
        Some(i) => i.checked_mul(unit.nanos()),
        None => {
            // A float, or an integer beyond i64. Whole units and the fraction are scaled
            // separately, so that `1700000000000.5` ms is exact to the nanosecond.
            let units = n.as_f64().unwrap_or(f64::NAN);
            let whole = units.trunc();
            // 2^63 is exactly representable, i64::MAX is not; NaN fails the comparison.
            (whole.abs() < 9_223_372_036_854_775_808.0)
                .then_some(whole as i64)
                .and_then(|whole_units| whole_units.checked_mul(unit.nanos()))
                .and_then(|ns| ns.checked_add(((units - whole) * unit.nanos() as f64).round() as i64))
        }
    };
    match ns {
        Some(ns) if in_range(ns) => Ok(ns),
        _ => Err(format!("{n} {unit} is outside {TIME_RANGE}")),
    }
}

fn rfc3339_timestamp(s: &str) -> Result<i64, String> {
    let (utc_or_local, offset_s) = split_utc_offset(s);
    let time =
        humantime::parse_rfc3339_weak(utc_or_local).map_err(|e| format!("{s:?} is not an RFC 3339 timestamp ({e})"))?;
    let since_epoch = time.duration_since(UNIX_EPOCH).map_err(|_| format!("{s:?} is outside {TIME_RANGE}"))?;
    let ns = since_epoch.as_nanos() as i128 - i128::from(offset_s) * 1_000_000_000;
    i64::try_from(ns).ok().filter(|ns| in_range(*ns)).ok_or_else(|| format!("{s:?} is outside {TIME_RANGE}"))
}

/// Splits a numeric UTC offset (`+02:00`, `-05:30`) off an RFC 3339 string, returning the
/// rest and the offset in seconds (humantime only understands UTC).
fn split_utc_offset(s: &str) -> (&str, i32) {
    const DATE_TIME: usize = "2018-02-14T00:28:07".len();
    let b = s.as_bytes();
    let Some(at) = b.len().checked_sub(6).filter(|at| *at >= DATE_TIME) else { return (s, 0) };
    let digit = |i: usize| b[at + i].is_ascii_digit().then(|| i32::from(b[at + i] - b'0'));
    let sign = match b[at] {
        b'+' => 1,
        b'-' => -1,
        _ => return (s, 0),
    };
    let (Some(h1), Some(h2), b':', Some(m1), Some(m2)) = (digit(1), digit(2), b[at + 3], digit(4), digit(5)) else {
        return (s, 0);
    };
    let (hours, minutes) = (h1 * 10 + h2, m1 * 10 + m2);
    if hours > 23 || minutes > 59 {
        return (s, 0);
    }
    // `at` is an ASCII sign, hence a char boundary.
    (&s[..at], sign * (hours * 3600 + minutes * 60))
}

// ---------------------------------------------------------------------------------------
// Line protocol

fn line_protocol_readings(text: &str, now_ns: i64, cfg: &PayloadConfig) -> Result<Vec<Reading>, PayloadError> {
    let mut readings = Vec::new();
    let mut next_line = 1;
    // `split_lines` splits like InfluxDB does: a quoted string value may span lines.
    for chunk in influxdb_line_protocol::split_lines(text) {
        let line = next_line;
        next_line += 1 + chunk.bytes().filter(|b| *b == b'\n').count();
        let chunk = chunk.strip_suffix('\r').unwrap_or(chunk);
        // `None` for a blank or comment line.
        let Some(parsed) = influxdb_line_protocol::parse_lines(chunk).next() else { continue };
        let parsed =
            parsed.map_err(|e| PayloadError::BadLineProtocol { line, msg: format!("{e} (in {})", snippet(chunk)) })?;
        if readings.len() == cfg.max_readings {
            return Err(PayloadError::TooManyReadings { max: cfg.max_readings });
        }
        readings.push(line_reading(parsed, line, now_ns)?);
    }
    if readings.is_empty() {
        return Err(PayloadError::Empty);
    }
    Ok(readings)
}

/// One parsed line → one reading.
fn line_reading(parsed: ParsedLine<'_>, line: usize, now_ns: i64) -> Result<Reading, PayloadError> {
    let at = Location::Line(line);
    let tags = parsed.series.tag_set.unwrap_or_default();
    let mut fields = Vec::with_capacity(tags.len() + parsed.field_set.len());
    for (key, value) in &tags {
        fields.push(Field { name: key.to_string(), value: Value::Str(value.to_string()) });
    }
    for (key, value) in parsed.field_set {
        let value = match value {
            FieldValue::F64(x) => Value::F64(x),
            FieldValue::I64(i) => Value::I64(i),
            FieldValue::U64(u) => Value::I64(i64::try_from(u).map_err(|_| PayloadError::BadLineProtocol {
                line,
                msg: format!("field {:?}: unsigned value {u}u does not fit a signed 64-bit integer", key.as_str()),
            })?),
            FieldValue::String(s) => Value::Str(s.into()),
            FieldValue::Boolean(b) => Value::Bool(b),
        };
        fields.push(Field { name: key.into(), value });
    }
    if let Some(dup) = find_duplicate(&fields) {
        let msg = if tags.iter().any(|(key, _)| *key == dup) {
            format!("{dup:?} is both a tag and a field")
        } else {
            format!("field {dup:?} occurs twice")
        };
        return Err(PayloadError::BadLineProtocol { line, msg });
    }
    let ts_ns = match parsed.timestamp {
        None => now_ns,
        Some(ts) if in_range(ts) => ts,
        Some(ts) => {
            return Err(PayloadError::BadTimestamp { at, msg: format!("timestamp {ts} ns is outside {TIME_RANGE}") });
        }
    };
    build_reading(parsed.series.measurement.into(), ts_ns, &fields, at)
}

/// The start of a line, quoted, for error messages.
fn snippet(line: &str) -> String {
    const MAX_CHARS: usize = 60;
    match line.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{:?}…", &line[..end]),
        None => format!("{line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// 2023-11-14T22:13:20Z, the arrival time of payloads without a timestamp.
    const NOW: i64 = 1_700_000_000_000_000_000;
    const TOPIC_STREAM: &str = "plant/line1";

    /// A reading as the tests spell it: stream, timestamp, fields (in any order).
    type Row = (String, i64, Vec<(String, Value)>);

    /// What a parse should give.
    enum Expect {
        /// These readings, in this order.
        Ok(Vec<Row>),
        /// An error with this reason whose message contains each of these strings.
        Err(&'static str, Vec<&'static str>),
    }

    fn ok(rows: impl IntoIterator<Item = Row>) -> Expect {
        Expect::Ok(rows.into_iter().collect())
    }

    fn err(reason: &'static str, needles: &[&'static str]) -> Expect {
        Expect::Err(reason, needles.to_vec())
    }

    fn row(stream: &str, ts: i64, fields: &[(&str, Value)]) -> Row {
        (stream.to_owned(), ts, fields.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect())
    }

    /// One reading on the MQTT test stream.
    fn on_topic(ts: i64, fields: &[(&str, Value)]) -> Expect {
        ok([row(TOPIC_STREAM, ts, fields)])
    }

    fn f(x: f64) -> Value {
        Value::F64(x)
    }
    fn i(x: i64) -> Value {
        Value::I64(x)
    }
    fn s(x: &str) -> Value {
        Value::Str(x.to_owned())
    }
    fn b(x: bool) -> Value {
        Value::Bool(x)
    }

    fn to_row(r: &Reading) -> Row {
        let mut fields: Vec<_> =
            r.fields.decode().expect("fields decode").into_iter().map(|f| (f.name, f.value)).collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        (r.stream.clone(), r.ts_ns, fields)
    }

    fn check(input: &str, got: Result<Vec<Reading>, PayloadError>, expected: &Expect) {
        match (got, expected) {
            (Ok(readings), Expect::Ok(rows)) => {
                let got: Vec<Row> = readings.iter().map(to_row).collect();
                let mut want: Vec<Row> = rows.clone();
                for r in &mut want {
                    r.2.sort_by(|a, b| a.0.cmp(&b.0));
                }
                assert_eq!(got, want, "input {input:?}");
            }
            (Err(e), Expect::Err(reason, needles)) => {
                let msg = e.to_string();
                assert_eq!(e.reason(), *reason, "input {input:?}: {msg}");
                for needle in needles {
                    assert!(msg.contains(needle), "input {input:?}: message {msg:?} should mention {needle:?}");
                }
            }
            (Ok(readings), Expect::Err(reason, _)) => {
                panic!("input {input:?}: expected {reason}, got {:?}", readings.iter().map(to_row).collect::<Vec<_>>())
            }
            (Err(e), Expect::Ok(_)) => panic!("input {input:?}: expected readings, got {} error: {e}", e.reason()),
        }
    }

    fn check_mqtt(cfg: &PayloadConfig, cases: Vec<(&str, Expect)>) {
        for (input, expected) in &cases {
            check(input, parse_mqtt(TOPIC_STREAM, input.as_bytes(), NOW, cfg), expected);
        }
    }

    const MS: i64 = 1_000_000;

    #[test]
    fn mqtt_json_objects() {
        let big = "a".repeat(limits::MAX_STRING_VALUE + 1);
        let long_string = format!(r#"{{"note":"{big}"}}"#);
        let many_fields =
            format!("{{{}}}", (0..=limits::MAX_FIELDS).map(|n| format!(r#""f{n}":1"#)).collect::<Vec<_>>().join(","));
        check_mqtt(
            &PayloadConfig::default(),
            vec![
                (r#"{"temp":21.5}"#, on_topic(NOW, &[("temp", f(21.5))])),
                ("  \n{\"temp\": 21.5}\n", on_topic(NOW, &[("temp", f(21.5))])),
                (r#"{"temp":21.5,"ts":1700000000123}"#, on_topic(1_700_000_000_123 * MS, &[("temp", f(21.5))])),
                (r#"{"s":"on","ok":false,"n":-3}"#, on_topic(NOW, &[("s", s("on")), ("ok", b(false)), ("n", f(-3.0))])),
                // Integers: floats up to ±2^53, I64 beyond, floats again past i64.
                (r#"{"x":9007199254740992}"#, on_topic(NOW, &[("x", f(9_007_199_254_740_992.0))])),
                (r#"{"x":9007199254740993}"#, on_topic(NOW, &[("x", i(9_007_199_254_740_993))])),
                (r#"{"x":-9007199254740993}"#, on_topic(NOW, &[("x", i(-9_007_199_254_740_993))])),
                (r#"{"x":9223372036854775807}"#, on_topic(NOW, &[("x", i(i64::MAX))])),
                (r#"{"x":18446744073709551615}"#, on_topic(NOW, &[("x", f(18_446_744_073_709_551_615.0))])),
                (r#"{"x":1e300}"#, on_topic(NOW, &[("x", f(1e300))])),
                // Flattening.
                (r#"{"a":{"b":1,"c":{"d":true}}}"#, on_topic(NOW, &[("a.b", f(1.0)), ("a.c.d", b(true))])),
                (r#"{"v":[1,2.5,"x"]}"#, on_topic(NOW, &[("v.0", f(1.0)), ("v.1", f(2.5)), ("v.2", s("x"))])),
                (r#"{"v":[{"a":1},{"a":2}]}"#, on_topic(NOW, &[("v.0.a", f(1.0)), ("v.1.a", f(2.0))])),
                (r#"{"v":[1,null,3],"n":null}"#, on_topic(NOW, &[("v.0", f(1.0)), ("v.2", f(3.0))])),
                (r#"{"a":{"":1}}"#, on_topic(NOW, &[("a.", f(1.0))])),
                // On MQTT "stream" is an ordinary field.
                (r#"{"stream":"other","a":1}"#, on_topic(NOW, &[("stream", s("other")), ("a", f(1.0))])),
                // Field errors.
                (
                    r#"{"temp":[[1,2]]}"#,
                    err("bad_field", &["payload", r#"field "temp": nested arrays are not supported"#]),
                ),
                (r#"{"a":{"temp":[1,[2]]}}"#, err("bad_field", &[r#""a.temp""#, "nested arrays"])),
                ("{}", err("bad_field", &["payload", "no fields"])),
                (r#"{"a":null,"b":{},"c":[]}"#, err("bad_field", &["no fields"])),
                (r#"{"ts":1700000000000}"#, err("bad_field", &["no fields"])),
                (r#"{"":1}"#, err("bad_field", &["field name", r#""""#])),
                // Issue 10: a U+0000 in a name stopped a PostgreSQL hub. Refused here, named.
                (r#"{"a\u0000":1}"#, err("bad_field", &["field name", r#""a\0""#, "U+0000"])),
                (r#"{"ok\u001b[31m":1}"#, err("bad_field", &["field name", "U+001B"])),
                (r#"{"a":{"b\u007f":1}}"#, err("bad_field", &["field name", "U+007F"])),
                (&long_string, err("bad_field", &[r#""note""#, "16384"])),
                (&many_fields, err("bad_field", &["payload", "more than 256 fields"])),
                (r#"{"a.b":1,"a":{"b":2}}"#, err("bad_field", &[r#""a.b""#, "twice"])),
                // Malformed JSON.
                (r#"{"a":"#, err("bad_json", &["payload", "line 1"])),
                ("{\n\"a\": 1,\n}", err("bad_json", &["line 3"])),
                (r#"{"a":1} x"#, err("bad_json", &["trailing"])),
                (r#"{"a":1e400}"#, err("bad_json", &["out of range"])),
            ],
        );
    }

    #[test]
    fn mqtt_json_arrays() {
        check_mqtt(
            &PayloadConfig::default(),
            vec![
                (
                    r#"[{"a":1,"ts":1700000000001},{"a":2,"ts":1700000000002},{"b":"x"}]"#,
                    ok([
                        row(TOPIC_STREAM, NOW + MS, &[("a", f(1.0))]),
                        row(TOPIC_STREAM, NOW + 2 * MS, &[("a", f(2.0))]),
                        row(TOPIC_STREAM, NOW, &[("b", s("x"))]),
                    ]),
                ),
                ("[]", err("empty", &[])),
                ("[1,2]", err("bad_json", &["element 0", "expected an object, found a number"])),
                (r#"[{"a":1},[{"a":2}]]"#, err("bad_json", &["element 1", "an array"])),
                (r#"[{"a":1},{"a":null}]"#, err("bad_field", &["element 1", "no fields"])),
                (r#"[{"a":1},{"a":1,"ts":"soon"}]"#, err("bad_timestamp", &["element 1", r#""ts""#, r#""soon""#])),
            ],
        );
        let cfg = PayloadConfig { max_readings: 2, ..PayloadConfig::default() };
        check_mqtt(
            &cfg,
            vec![
                (
                    r#"[{"a":1},{"a":2}]"#,
                    ok([row(TOPIC_STREAM, NOW, &[("a", f(1.0))]), row(TOPIC_STREAM, NOW, &[("a", f(2.0))])]),
                ),
                (r#"[{"a":1},{"a":2},{"a":3}]"#, err("too_many_readings", &["more than 2"])),
            ],
        );
    }

    #[test]
    fn mqtt_bare_values() {
        check_mqtt(
            &PayloadConfig::default(),
            vec![
                ("42", on_topic(NOW, &[("value", f(42.0))])),
                ("  -1.5e3 \r\n", on_topic(NOW, &[("value", f(-1500.0))])),
                ("9007199254740993", on_topic(NOW, &[("value", i(9_007_199_254_740_993))])),
                ("true", on_topic(NOW, &[("value", b(true))])),
                ("false", on_topic(NOW, &[("value", b(false))])),
                // Not a bare value: read as line protocol, which fails.
                ("null", err("bad_line_protocol", &["line 1"])),
                (r#""hello""#, err("bad_line_protocol", &["line 1"])),
            ],
        );
        let got = parse_mqtt("bad+stream", b"1", NOW, &PayloadConfig::default());
        check("1 on bad+stream", got, &err("bad_stream", &["payload", "bad+stream"]));
    }

    #[test]
    fn json_timestamps() {
        let at = |ts: &str| format!(r#"{{"a":1,"ts":{ts}}}"#);
        let cases = |cfg: PayloadConfig, cases: Vec<(String, Expect)>| {
            for (input, expected) in &cases {
                check(input, parse_mqtt(TOPIC_STREAM, input.as_bytes(), NOW, &cfg), expected);
            }
        };
        let a = [("a", f(1.0))];
        let secs = PayloadConfig { timestamp_unit: TimestampUnit::S, ..PayloadConfig::default() };
        let micros = PayloadConfig { timestamp_unit: TimestampUnit::Us, ..PayloadConfig::default() };
        let nanos = PayloadConfig { timestamp_unit: TimestampUnit::Ns, ..PayloadConfig::default() };
        let renamed = PayloadConfig { timestamp_field: "time".to_owned(), ..PayloadConfig::default() };
        cases(
            PayloadConfig::default(),
            vec![
                (at("1700000000000"), on_topic(NOW, &a)),
                (at("1700000000000.5"), on_topic(NOW + 500_000, &a)),
                // Before 2000: a unit mistake (seconds sent as ms) or an unset clock.
                (at("0"), err("bad_timestamp", &[r#""ts""#, "outside 2000-01-01"])),
                (at("1700000000"), err("bad_timestamp", &[r#""ts""#, "outside 2000-01-01"])),
                (at(r#""1999-12-31T23:59:59Z""#), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at(r#""2200-01-01T00:00:00Z""#), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at(r#""2023-11-14T22:13:20Z""#), on_topic(NOW, &a)),
                (at(r#""2023-11-14T22:13:20.123456789Z""#), on_topic(NOW + 123_456_789, &a)),
                (at(r#""2023-11-15T00:43:20+02:30""#), on_topic(NOW, &a)),
                (at(r#""2023-11-14T17:13:20-05:00""#), on_topic(NOW, &a)),
                (at(r#""2023-11-14T22:13:20+00:00""#), on_topic(NOW, &a)),
                (at(r#""2023-11-14 22:13:20""#), on_topic(NOW, &a)),
                (at(r#""yesterday""#), err("bad_timestamp", &["payload", r#"timestamp field "ts""#, "RFC 3339"])),
                (at(r#""1969-12-31T23:59:59Z""#), err("bad_timestamp", &[r#""ts""#])),
                (at(r#""1970-01-01T00:30:00+01:00""#), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at(r#""2262-04-12T00:00:00Z""#), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at("-1"), err("bad_timestamp", &[r#""ts""#, "-1 ms is outside"])),
                (at("9300000000000000"), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at("1e30"), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at("18446744073709551615"), err("bad_timestamp", &[r#""ts""#, "outside"])),
                (at("true"), err("bad_timestamp", &[r#""ts""#, "found a boolean"])),
                (at("null"), err("bad_timestamp", &[r#""ts""#, "found null"])),
                (at(r#"{"s":1}"#), err("bad_timestamp", &[r#""ts""#, "found an object"])),
            ],
        );
        cases(
            secs,
            vec![
                (at("1700000000"), on_topic(NOW, &a)),
                (at("1700000000.5"), on_topic(NOW + 500_000_000, &a)),
                (at(r#""2023-11-14T22:13:20Z""#), on_topic(NOW, &a)),
                (at("9300000000"), err("bad_timestamp", &["9300000000 s is outside"])),
            ],
        );
        cases(micros, vec![(at("1700000000000001"), on_topic(NOW + 1_000, &a))]);
        cases(
            nanos,
            vec![
                (at("1700000000000000001"), on_topic(NOW + 1, &a)),
                (at("9223372036854775807"), err("bad_timestamp", &[r#""ts""#, "outside"])),
            ],
        );
        cases(
            renamed,
            vec![
                // `ts` is an ordinary field when the timestamp key is `time`.
                (r#"{"a":1,"ts":5,"time":1700000000000}"#.into(), on_topic(NOW, &[("a", f(1.0)), ("ts", f(5.0))])),
                (r#"{"a":1,"time":"x"}"#.into(), err("bad_timestamp", &[r#"timestamp field "time""#])),
            ],
        );
    }

    #[test]
    fn line_protocol() {
        let cpu = |ts: i64, fields: &[(&str, Value)]| row("cpu", ts, fields);
        check_mqtt(
            &PayloadConfig::default(),
            vec![
                (
                    r#"cpu,host=a,region=west usage=1.5,count=3i,u=4u,ok=t,msg="hi there" 1700000000000000001"#,
                    ok([cpu(
                        NOW + 1,
                        &[
                            ("host", s("a")),
                            ("region", s("west")),
                            ("usage", f(1.5)),
                            ("count", i(3)),
                            ("u", i(4)),
                            ("ok", b(true)),
                            ("msg", s("hi there")),
                        ],
                    )]),
                ),
                ("cpu v=1", ok([cpu(NOW, &[("v", f(1.0))])])),
                (
                    "# header\n\ncpu v=1\n   \n  # indented comment\nmem,host=b v=2 1700000000000000005\n",
                    ok([cpu(NOW, &[("v", f(1.0))]), row("mem", NOW + 5, &[("host", s("b")), ("v", f(2.0))])]),
                ),
                ("cpu v=1\r\nmem v=2\r\n", ok([cpu(NOW, &[("v", f(1.0))]), row("mem", NOW, &[("v", f(2.0))])])),
                // A quoted string may span lines; later line numbers still count physical lines.
                ("cpu msg=\"a\nb\"\nmem v=1\nbad", err("bad_line_protocol", &["line 4", "\"bad\""])),
                (
                    r"sensors/line\ 1,room=a\,b v=1",
                    ok([row("sensors/line 1", NOW, &[("room", s("a,b")), ("v", f(1.0))])]),
                ),
                ("cpu v=9223372036854775807u", ok([cpu(NOW, &[("v", i(i64::MAX))])])),
                // Errors name the line.
                ("cpu v=1\nmem\n", err("bad_line_protocol", &["line 2", "\"mem\""])),
                ("cpu v=1\nmem v=", err("bad_line_protocol", &["line 2"])),
                ("cpu v=1 12 extra", err("bad_line_protocol", &["line 1"])),
                ("cpu,v=a v=1", err("bad_line_protocol", &["line 1", r#""v" is both a tag and a field"#])),
                ("cpu a=1,a=2", err("bad_line_protocol", &["line 1", r#"field "a" occurs twice"#])),
                ("cpu,h=a,h=b v=1", err("bad_line_protocol", &["line 1", "\"h\""])),
                (
                    "\ncpu v=18446744073709551615u",
                    err("bad_line_protocol", &["line 2", r#"field "v""#, "does not fit"]),
                ),
                ("cpu v=1 -5", err("bad_timestamp", &["line 1", "-5 ns is outside"])),
                ("cpu v=1e999", err("bad_field", &["line 1", r#""v""#, "finite"])),
                ("cpu v=1\ncpu+x v=1", err("bad_stream", &["line 2", "cpu+x"])),
                ("# only a comment\n\n", err("empty", &[])),
            ],
        );
        let cfg = PayloadConfig { max_readings: 2, ..PayloadConfig::default() };
        check_mqtt(
            &cfg,
            vec![
                ("a v=1\nb v=2\n# c v=3", ok([row("a", NOW, &[("v", f(1.0))]), row("b", NOW, &[("v", f(2.0))])])),
                ("a v=1\nb v=2\nc v=3", err("too_many_readings", &["more than 2"])),
            ],
        );
    }

    #[test]
    fn payload_level_errors() {
        let cfg = PayloadConfig { max_payload_bytes: 10, ..PayloadConfig::default() };
        let tiny = |payload: &[u8]| parse_mqtt(TOPIC_STREAM, payload, NOW, &cfg);
        check("11 bytes", tiny(b"{\"a\":12345}"), &err("too_large", &["11 bytes", "limit of 10"]));
        // Size is checked first, even before UTF-8.
        check("11 bad bytes", tiny(&[0xff; 11]), &err("too_large", &[]));
        check("10 bytes", tiny(b"{\"a\":1234}"), &on_topic(NOW, &[("a", f(1234.0))]));
        let any = |payload: &[u8]| parse_mqtt(TOPIC_STREAM, payload, NOW, &PayloadConfig::default());
        check("bad utf-8", any(b"{\"a\":\"\xff\"}"), &err("not_utf8", &["offset 6"]));
        check("truncated utf-8", any(&"{\"a\":\"é\"}".as_bytes()[..7]), &err("not_utf8", &["offset 6"]));
        for blank in ["", " ", " \n\t\r\n "] {
            check(blank, any(blank.as_bytes()), &err("empty", &[]));
        }
    }

    #[test]
    fn http_bodies() {
        let cfg = PayloadConfig::default();
        let cases: Vec<(Option<&str>, Option<&str>, &str, Expect)> = vec![
            (
                None,
                Some("application/json"),
                r#"[{"stream":"a","v":1},{"stream":"b","v":2,"ts":1700000000007}]"#,
                ok([row("a", NOW, &[("v", f(1.0))]), row("b", NOW + 7 * MS, &[("v", f(2.0))])]),
            ),
            (
                None,
                Some("application/json; charset=utf-8"),
                r#"{"stream":"a","v":1}"#,
                ok([row("a", NOW, &[("v", f(1.0))])]),
            ),
            (None, Some("Application/JSON"), r#"{"stream":"a","v":1}"#, ok([row("a", NOW, &[("v", f(1.0))])])),
            // The default stream serves objects without "stream"; their own "stream" wins.
            (
                Some("dflt"),
                Some("application/json"),
                r#"[{"v":1},{"stream":"own","v":2}]"#,
                ok([row("dflt", NOW, &[("v", f(1.0))]), row("own", NOW, &[("v", f(2.0))])]),
            ),
            (
                None,
                Some("application/json"),
                r#"[{"stream":"a","v":1},{"v":2}]"#,
                err("bad_stream", &["element 1", "no \"stream\""]),
            ),
            (
                None,
                Some("application/json"),
                r#"{"stream":7,"v":1}"#,
                err("bad_stream", &["payload", "must be a string"]),
            ),
            (None, Some("application/json"), r#"{"stream":"a#b","v":1}"#, err("bad_stream", &["a#b"])),
            (
                None,
                Some("application/json"),
                r#"{"stream":"a\u0000b","v":1}"#,
                err("bad_stream", &["stream name", "U+0000"]),
            ),
            (Some(""), Some("application/json"), r#"{"v":1}"#, err("bad_stream", &["stream name", "empty"])),
            (None, Some("application/json"), r#"{"stream":"a"}"#, err("bad_field", &["no fields"])),
            (Some("s"), Some("application/json"), "42", err("bad_json", &["expected an object or an array"])),
            (Some("s"), Some("application/json"), "[]", err("empty", &[])),
            (Some("s"), Some("application/json"), "cpu v=1", err("bad_json", &["line 1"])),
            // Line protocol: the measurement is the stream, `?stream=` is ignored.
            (
                Some("dflt"),
                None,
                "cpu v=1\nmem v=2i 1700000000000000003",
                ok([row("cpu", NOW, &[("v", f(1.0))]), row("mem", NOW + 3, &[("v", i(2))])]),
            ),
            (None, Some("text/plain; charset=utf-8"), "cpu v=1", ok([row("cpu", NOW, &[("v", f(1.0))])])),
            (None, Some("text/plain"), r#"{"stream":"a","v":1}"#, err("bad_line_protocol", &["line 1"])),
            (None, Some("application/xml"), "<a/>", err("unsupported_content_type", &["application/xml"])),
            (None, Some("text/plain"), "", err("empty", &[])),
        ];
        for (default_stream, content_type, body, expected) in &cases {
            let got = parse_http(*default_stream, *content_type, body.as_bytes(), NOW, &cfg);
            check(&format!("{content_type:?} {body}"), got, expected);
        }
        let small = PayloadConfig { max_payload_bytes: 3, ..PayloadConfig::default() };
        check("too large", parse_http(None, Some("application/xml"), b"cpu v=1", NOW, &small), &err("too_large", &[]));
    }

    #[test]
    fn config_defaults_and_serde() {
        let cfg = PayloadConfig::default();
        assert_eq!(cfg.timestamp_field, "ts");
        assert_eq!(cfg.timestamp_unit, TimestampUnit::Ms);
        assert_eq!(cfg.max_payload_bytes, 256 * 1024);
        assert_eq!(cfg.max_readings, 100_000);
        assert_eq!(serde_json::from_str::<PayloadConfig>("{}").unwrap(), cfg);
        let parsed: PayloadConfig = serde_json::from_str(r#"{"timestamp_unit":"s","timestamp_field":"time"}"#).unwrap();
        assert_eq!(
            parsed,
            PayloadConfig { timestamp_unit: TimestampUnit::S, timestamp_field: "time".into(), ..cfg.clone() }
        );
        for unit in [TimestampUnit::S, TimestampUnit::Ms, TimestampUnit::Us, TimestampUnit::Ns] {
            assert_eq!(serde_json::to_string(&unit).unwrap(), format!("\"{unit}\""));
        }
        let unknown = serde_json::from_str::<PayloadConfig>(r#"{"timestamp_units":"s"}"#).unwrap_err();
        assert!(unknown.to_string().contains("timestamp_units"), "{unknown}");
        assert!(serde_json::from_str::<PayloadConfig>(r#"{"timestamp_unit":"minutes"}"#).is_err());
    }

    /// An arbitrary JSON value, nested a few levels.
    fn json_value() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Json::from),
            "[a-z ]{0,8}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                proptest::collection::btree_map("[a-z.]{0,6}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Parses with every entry point; only panics matter. Successes must be well-formed.
    fn parse_everywhere(payload: &[u8]) {
        let cfg = PayloadConfig { max_readings: 50, ..PayloadConfig::default() };
        let results = [
            parse_mqtt(TOPIC_STREAM, payload, NOW, &cfg),
            parse_http(Some("s"), Some("application/json"), payload, NOW, &cfg),
            parse_http(None, None, payload, NOW, &cfg),
        ];
        for readings in results.into_iter().flatten() {
            assert!(!readings.is_empty() && readings.len() <= cfg.max_readings);
            for r in &readings {
                assert!(r.fields.decode().is_ok() && validate_stream_name(&r.stream).is_ok() && r.ts_ns >= 0);
            }
        }
    }

    /// A finite number as JSON text, the field value it must become, and whether serde_json's
    /// default float parser is guaranteed to get it exactly (see [`ulps_allowed`]).
    fn number() -> impl Strategy<Value = (String, Value, bool)> {
        let finite = || any::<f64>().prop_filter("finite", |x| x.is_finite());
        prop_oneof![
            // Integers: exact, `I64` beyond ±2^53.
            any::<i64>().prop_map(|n| {
                let v = if n.unsigned_abs() > 1 << 53 { Value::I64(n) } else { Value::F64(n as f64) };
                (n.to_string(), v, true)
            }),
            // Sensor-like decimals (15 digits, modest exponent): always exact.
            (-999_999_999_999_999_i64..=999_999_999_999_999, -22..=22_i32).prop_map(|(m, e)| {
                let text = format!("{m}e{e}");
                let v = Value::F64(text.parse().expect("valid float"));
                (text, v, true)
            }),
            // Any finite float, as serde_json and as Rust's `{:e}` write it.
            finite().prop_map(|x| (Json::from(x).to_string(), Value::F64(x), false)),
            finite().prop_map(|x| (format!("{x:e}"), Value::F64(x), false)),
            // Display writes integral floats without a fraction ("1e18" as "1000000000000000000"):
            // such text is an integer, which the rules make `I64` beyond ±2^53.
            finite().prop_map(|x| {
                let text = format!("{x}");
                match text.parse::<i64>() {
                    Ok(n) if n.unsigned_abs() > 1 << 53 => (text, Value::I64(n), true),
                    _ => (text, Value::F64(x), false),
                }
            }),
        ]
    }

    /// How many ULPs a parsed float may be off. serde_json parses floats exactly only with its
    /// `float_roundtrip` feature; by default it is "best effort", up to 2 ULPs off for numbers
    /// with 17 significant digits or large exponents (measured over 10^7 random floats). The
    /// feature is probed with a number the default parser gets wrong, so that this test
    /// demands exactness by itself once the feature is on.
    fn ulps_allowed() -> u64 {
        let exact = serde_json::from_str::<f64>("-9.296705474391965e-82").expect("a float") == -9.296705474391965e-82;
        if exact { 0 } else { 2 }
    }

    /// Whether a parsed number is the expected one, allowing `ulps` for floats.
    fn same_number(got: &Value, want: &Value, ulps: u64) -> bool {
        match (got, want) {
            (Value::F64(g), Value::F64(w)) => {
                g == w || (g.is_sign_negative() == w.is_sign_negative() && g.to_bits().abs_diff(w.to_bits()) <= ulps)
            }
            _ => got == want,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_on_bytes(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            parse_everywhere(&payload);
        }

        #[test]
        fn never_panics_on_text(payload in r#"[a-z0-9 ,=."\\#{}\[\]:\n\r\t+-]{0,120}"#) {
            parse_everywhere(payload.as_bytes());
        }

        #[test]
        fn never_panics_on_json(value in json_value(), array in any::<bool>()) {
            let value = if array { Json::Array(vec![value.clone(), value]) } else { value };
            parse_everywhere(serde_json::to_string(&value).unwrap().as_bytes());
        }

        #[test]
        fn numbers_round_trip(fields in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_.]{0,20}", number(), 1..40)) {
            prop_assume!(!fields.contains_key("ts"));
            let body = fields.iter().map(|(k, (text, ..))| format!("{k:?}:{text}")).collect::<Vec<_>>().join(",");
            let readings = parse_mqtt(TOPIC_STREAM, format!("{{{body}}}").as_bytes(), NOW, &PayloadConfig::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(readings.len(), 1);
            prop_assert_eq!(readings[0].ts_ns, NOW);
            let got: BTreeMap<String, Value> =
                readings[0].fields.decode().unwrap().into_iter().map(|f| (f.name, f.value)).collect();
            prop_assert_eq!(got.keys().collect::<Vec<_>>(), fields.keys().collect::<Vec<_>>());
            let inexact_ulps = ulps_allowed();
            for (name, (text, want, exact)) in &fields {
                let ulps = if *exact { 0 } else { inexact_ulps };
                prop_assert!(same_number(&got[name], want, ulps), "{}: got {:?}, want {:?}", text, got[name], want);
            }
        }
    }
}
