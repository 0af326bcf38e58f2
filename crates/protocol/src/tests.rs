use super::*;
use proptest::prelude::*;

fn field(name: &str, value: Value) -> Field {
    Field { name: name.into(), value }
}

fn batch() -> AgentMessage {
    AgentMessage::BatchV1(BatchV1 {
        agent_id: "a1".into(),
        epoch: 7,
        seq: 3,
        created_ms: 1_000,
        streams: vec![StreamChunk {
            stream: "s".into(),
            points: vec![Point { ts_ns: 5, fields: FieldsBlob::encode(&[field("v", Value::I64(-1))]).unwrap() }],
        }],
        losses: vec![LossReport { stream: "s".into(), reason: LossReason::StoreFull, total: 2 }],
    })
}

/// Golden bytes: if this test fails, a change broke wire compatibility with deployed
/// agents or hubs. Add a new version variant instead of changing an existing one.
#[test]
fn golden_bytes_batch_v1() {
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0,                // AgentMessage::BatchV1
        2, b'a', b'1',    // agent_id
        7,                // epoch
        3,                // seq
        0xd0, 0x0f,       // created_ms = 1000 (zigzag varint)
        1,                // one stream chunk
        1, b's',          //   stream "s"
        1,                //   one point
        10,               //     ts_ns = 5 (zigzag)
        5,                //     fields blob, 5 bytes:
        1, 1, b'v', 1, 1, //       [Field { "v", I64(-1) }]
        1,                // one loss report
        1, b's', 1, 2,    //   "s", StoreFull, total 2
    ];
    assert_eq!(batch().encode(), expected);
    assert_eq!(AgentMessage::decode(expected).unwrap(), batch());
}

fn module_ref() -> ModuleRef {
    ModuleRef { name: "m".into(), version: "1".into(), sha256: [0xab; 32] }
}

fn batch_v2() -> AgentMessage {
    let AgentMessage::BatchV1(b) = batch() else { unreachable!() };
    let mut b = BatchV2::from(b);
    b.lineage.push(ChunkLineage { chunk: 0, module: module_ref() });
    AgentMessage::BatchV2(b)
}

#[test]
fn golden_bytes_batch_v2() {
    let v1 = batch().encode();
    let mut expected = vec![1u8]; // AgentMessage::BatchV2
    expected.extend_from_slice(&v1[1..]); // the V1 fields, unchanged
    expected.extend_from_slice(&[1, 0, 1, b'm', 1, b'1']); // one lineage: chunk 0, "m", "1"
    expected.extend_from_slice(&[0xab; 32]); // sha256, fixed size
    assert_eq!(batch_v2().encode(), expected);
    assert_eq!(AgentMessage::decode(&expected).unwrap(), batch_v2());
}

#[test]
fn v1_batches_decode_as_current_batch_without_lineage() {
    let b = AgentMessage::decode_batch(&batch().encode()).unwrap();
    assert!(b.lineage.is_empty());
    assert_eq!(b.module_of(0), None);
    let b = AgentMessage::decode_batch(&batch_v2().encode()).unwrap();
    assert_eq!(b.module_of(0), Some(&module_ref()));
}

#[test]
fn refuses_bad_lineage() {
    let AgentMessage::BatchV2(good) = batch_v2() else { unreachable!() };
    let check = |f: &dyn Fn(&mut BatchV2), want: &str| {
        let mut b = good.clone();
        f(&mut b);
        let err = AgentMessage::decode(&AgentMessage::BatchV2(b).encode()).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    };
    check(&|b| b.lineage[0].chunk = 1, "chunk 1 of a batch with 1 chunks");
    check(&|b| b.lineage.push(b.lineage[0].clone()), "strictly ascending");
    check(&|b| b.lineage[0].module.name.clear(), "module name");
    check(&|b| b.lineage[0].module.version = "x".repeat(MAX_MODULE_LABEL + 1), "module version");
}

#[test]
fn sha256_hex_round_trips() {
    let m = module_ref();
    assert_eq!(ModuleRef::parse_sha256(&m.sha256_hex()), Some(m.sha256));
    assert_eq!(ModuleRef::parse_sha256("ab"), None);
    assert_eq!(ModuleRef::parse_sha256(&"zz".repeat(32)), None);
}

#[test]
fn golden_bytes_ack_v1() {
    let ack = HubMessage::AckV1(AckV1 { epoch: 7, seqs: vec![1, 300] });
    let expected: &[u8] = &[0, 7, 2, 1, 0xac, 0x02];
    assert_eq!(ack.encode(), expected);
    assert_eq!(HubMessage::decode(expected).unwrap(), ack);
}

#[test]
fn golden_bytes_signed_v1() {
    let signed = SignedV1 { message: vec![0, 7, 1, 1], key_id: [0xaa; 8], signature: vec![0x55; 64] };
    let m = HubMessage::SignedV1(signed.clone());
    // Variant 1, the message's length and bytes, the key id (a fixed array, no length),
    // the signature's length and bytes.
    let mut expected = vec![1, 4, 0, 7, 1, 1];
    expected.extend([0xaa; 8]);
    expected.push(64);
    expected.extend([0x55; 64]);
    assert_eq!(m.encode(), expected);
    assert_eq!(HubMessage::decode(&expected).unwrap(), m);
    assert_eq!(HubKind::Ack.seal(signed.clone()), expected);
    assert_eq!(HubKind::Ack.signed_part(&expected).unwrap(), Some(signed.clone()));
    // The same signed message in the other envelopes: only the variant index differs.
    let mut announcement = expected.clone();
    assert_eq!(HubKind::Announcement.seal(signed.clone()), announcement);
    announcement[0] = 2;
    assert_eq!(HubKind::Desired.seal(signed.clone()), announcement);
    assert_eq!(HubKind::Desired.signed_part(&announcement).unwrap(), Some(signed.clone()));
    assert!(DesiredState::decode(&announcement).is_err(), "a signed desired state is not decoded unverified");
}

#[test]
fn signed_part_passes_unsigned_messages_and_refuses_bad_signed_ones() {
    let ack = HubMessage::AckV1(AckV1 { epoch: 7, seqs: vec![1] }).encode();
    assert_eq!(HubKind::Ack.signed_part(&ack), Ok(None));
    assert_eq!(HubKind::Desired.signed_part(&desired().encode()), Ok(None));
    let online = HubAnnouncement::OnlineV1(HubOnlineV1 { subscribed_ms: 1 }).encode();
    assert_eq!(HubKind::Announcement.signed_part(&online), Ok(None));
    let sealed =
        |message: Vec<u8>, sig: usize| HubKind::Ack.seal(SignedV1 { message, key_id: [1; 8], signature: vec![0; sig] });
    // A signature of the wrong length.
    assert!(HubKind::Ack.signed_part(&sealed(ack.clone(), 63)).is_err());
    // A signed message inside a signed message.
    assert!(HubKind::Ack.signed_part(&sealed(sealed(ack.clone(), 64), 64)).is_err());
    // Truncated and trailing bytes.
    let good = sealed(ack, 64);
    assert!(HubKind::Ack.signed_part(&good[..good.len() - 1]).is_err());
    let mut long = good.clone();
    long.push(0);
    assert!(HubKind::Ack.signed_part(&long).is_err());
}

#[test]
fn refuses_unknown_version() {
    let mut bytes = batch().encode();
    bytes[0] = 9;
    assert!(matches!(AgentMessage::decode(&bytes), Err(DecodeError::Postcard(_))));
}

#[test]
fn refuses_trailing_bytes_and_truncation() {
    let mut bytes = batch().encode();
    bytes.push(0);
    assert_eq!(AgentMessage::decode(&bytes), Err(DecodeError::TrailingBytes(1)));
    let bytes = batch().encode();
    for cut in 0..bytes.len() {
        assert!(AgentMessage::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
    }
}

#[test]
fn refuses_bad_names_and_values() {
    let check = |fields: &[Field], want: &str| {
        let err = FieldsBlob::encode(fields).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    };
    check(&[], "at least one field");
    check(&[field("", Value::Bool(true))], "field name");
    check(&[field("x", Value::F64(f64::NAN))], "finite");
    check(&[field("x", Value::Str("a".repeat(limits::MAX_STRING_VALUE + 1)))], "limit");
    // Control characters (PostgreSQL text cannot hold U+0000) in any name, named in the error.
    for bad in ["a\u{0}", "\u{1f}x", "t\u{7f}", "tab\there", "c1\u{85}"] {
        check(&[field(bad, Value::Bool(true))], "control character");
        let err = validate_stream_name(bad).unwrap_err().to_string();
        assert!(err.contains("stream name") && err.contains("control character"), "{err}");
    }
    check(&[field(&"f".repeat(limits::MAX_FIELD_NAME + 1), Value::Bool(true))], "limit 128");
    assert!(validate_field_name("temp.°C ünï").is_ok());
    assert!(validate_stream_name("a/+/b").is_err());
    assert!(validate_stream_name("").is_err());
    assert!(validate_stream_name("line1/temp").is_ok());
    assert!(validate_agent_id("edge-01.plant_a").is_ok());
    assert!(validate_agent_id("a/b").is_err());
    assert!(validate_agent_id("").is_err());
}

#[test]
fn batch_with_corrupt_fields_blob_is_refused() {
    let AgentMessage::BatchV1(mut b) = batch() else { unreachable!() };
    b.streams[0].points[0].fields = FieldsBlob(vec![1, 1, b'v', 9]);
    assert!(AgentMessage::decode(&AgentMessage::BatchV1(b).encode()).is_err());
}

#[test]
fn topics_round_trip() {
    assert_eq!(topics::agent_of_batch_topic(&topics::batches("edge-1")), Some("edge-1"));
    assert_eq!(topics::agent_of_batch_topic("brume/v1/agents/x/acks"), None);
    assert_eq!(topics::agent_of_batch_topic("other/x/batches"), None);
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-1e12f64..1e12).prop_map(Value::F64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        "[a-z ]{0,20}".prop_map(Value::Str),
    ]
}

fn arb_fields() -> impl Strategy<Value = Vec<Field>> {
    prop::collection::vec(("[a-z_]{1,12}", arb_value()).prop_map(|(n, v)| Field { name: n, value: v }), 1..6)
}

proptest! {
    #[test]
    fn batch_round_trips(
        agent in "[a-z0-9-]{1,20}",
        epoch in any::<u64>(),
        seq in 1u64..,
        chunks in prop::collection::vec(
            ("[a-z/]{1,16}", prop::collection::vec((any::<i64>(), arb_fields()), 0..8)),
            0..5,
        ),
    ) {
        let streams = chunks.into_iter().map(|(stream, pts)| StreamChunk {
            stream,
            points: pts.into_iter().map(|(ts_ns, f)| Point { ts_ns, fields: FieldsBlob::encode(&f).unwrap() }).collect(),
        }).collect();
        let msg = AgentMessage::BatchV1(BatchV1 { agent_id: agent, epoch, seq, created_ms: 0, streams, losses: vec![] });
        prop_assert_eq!(AgentMessage::decode(&msg.encode()).unwrap(), msg);
    }

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = AgentMessage::decode(&bytes);
        let _ = AgentMessage::decode_batch(&bytes);
        let _ = HubMessage::decode(&bytes);
        let _ = AgentStatus::decode(&bytes);
    }

    /// Valid messages with a few bytes overwritten, truncated or extended: closer to what
    /// a buggy or hostile peer sends than random bytes, so it reaches the validation
    /// after the envelope. Decoding refuses or accepts; it never panics.
    #[test]
    fn mutated_messages_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
        extra in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let status = AgentStatus::V1(StatusV1 {
            modules: vec![ModuleHealth { name: "m".into(), sha256: "ab".into(), enabled: true, batches_failed: 1, last_error: "e".into() }],
            labels: vec![("site".into(), "a".into())],
            ..status()
        });
        for valid in [batch().encode(), batch_v2().encode(), status.encode()] {
            let mut bytes = valid.clone();
            for &(at, b) in &edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend_from_slice(&extra);
            let _ = AgentMessage::decode(&bytes);
            let _ = AgentMessage::decode_batch(&bytes);
            let _ = AgentStatus::decode(&bytes);
        }
    }
}

/// A valid presence message with no modules.
fn status() -> StatusV1 {
    StatusV1 {
        agent_id: "a".into(),
        online: true,
        version: "1".into(),
        started_ms: 1,
        sent_ms: 2,
        heartbeat_s: 10,
        store_readings: 3,
        outbox_batches: 4,
        outbox_readings: 5,
        modules: vec![],
        labels: vec![],
    }
}

#[test]
fn golden_bytes_status_v1() {
    let st = AgentStatus::V1(StatusV1 {
        modules: vec![ModuleHealth {
            name: "m".into(),
            sha256: String::new(),
            enabled: false,
            batches_failed: 6,
            last_error: "x".into(),
        }],
        labels: vec![("k".into(), "v".into())],
        ..status()
    });
    let expected: &[u8] =
        &[0, 1, b'a', 1, 1, b'1', 2, 4, 10, 3, 4, 5, 1, 1, b'm', 0, 0, 6, 1, b'x', 1, 1, b'k', 1, b'v'];
    assert_eq!(st.encode(), expected);
    let AgentStatus::V1(inner) = st else { unreachable!("built as V1") };
    assert_eq!(AgentStatus::decode(expected).unwrap(), inner);
    assert_eq!(topics::agent_of_status_topic(&topics::status("edge-1")), Some("edge-1"));
    assert_eq!(topics::agent_of_status_topic(&topics::batches("edge-1")), None);
}

#[test]
fn golden_bytes_status_v2() {
    let ext = StatusExtV2 { oldest_outbox_ms: Some(7) };
    let st = AgentStatus::V2(status(), ext.clone());
    // Variant 1, then version 1's bytes, then the optional time (1 = Some, zigzag 7 = 14).
    let mut expected = AgentStatus::V1(status()).encode();
    expected[0] = 1;
    expected.extend_from_slice(&[1, 14]);
    assert_eq!(st.encode(), expected);
    assert_eq!(AgentStatus::decode_full(&expected).unwrap(), (status(), ext));
    assert_eq!(AgentStatus::decode(&expected).unwrap(), status());
    // A version 1 message decodes with version 2's defaults.
    assert_eq!(
        AgentStatus::decode_full(&AgentStatus::V1(status()).encode()).unwrap(),
        (status(), StatusExtV2::default())
    );
    // Validation applies to version 2 as well.
    let bad = StatusV1 { agent_id: "a/b".into(), ..status() };
    assert!(matches!(
        AgentStatus::decode(&AgentStatus::V2(bad, StatusExtV2::default()).encode()),
        Err(DecodeError::Invalid { .. })
    ));
}

#[test]
fn status_with_bad_id_or_oversize_labels_is_refused() {
    let ok = status();
    for bad in [
        StatusV1 { agent_id: "a/b".into(), ..ok.clone() },
        StatusV1 { version: "v".repeat(MAX_STATUS_LABEL + 1), ..ok.clone() },
        StatusV1 {
            modules: vec![
                ModuleHealth {
                    name: "m".into(),
                    sha256: String::new(),
                    enabled: true,
                    batches_failed: 0,
                    last_error: String::new()
                };
                MAX_STATUS_MODULES + 1
            ],
            ..ok.clone()
        },
    ] {
        assert!(matches!(AgentStatus::decode(&AgentStatus::V1(bad).encode()), Err(DecodeError::Invalid { .. })));
    }
    assert!(AgentStatus::decode(&AgentStatus::V1(ok).encode()).is_ok());
}

#[test]
fn hub_announcement_golden_bytes() {
    let m = HubAnnouncement::OnlineV1(HubOnlineV1 { subscribed_ms: 1 });
    // Variant 0, then the zigzag varint of 1.
    assert_eq!(m.encode(), [0x00, 0x02]);
    assert_eq!(HubAnnouncement::decode(&m.encode()), Ok(m));
    assert!(HubAnnouncement::decode(&[0x02, 0x02]).is_err(), "unknown version");
}

fn desired() -> DesiredState {
    DesiredState::V1(DesiredV1 {
        agent_id: "a1".into(),
        generation: 3,
        issued_ms: 1_000,
        modules: vec![DesiredModuleV1 {
            module: ModuleRef { name: "m".into(), version: "2".into(), sha256: [7; 32] },
            size: 300,
            signature: "s".into(),
            config_json: "{}".into(),
            inputs: Some(vec!["t/#".into()]),
            deployment: 9,
            probation: Probation { duration_s: 60, max_failed_batches: 0 },
        }],
    })
}

/// Golden bytes of the control plane: deployed agents decode these; a change is a new
/// variant, never an edit.
#[test]
fn golden_bytes_desired_v1_and_report_v1() {
    let mut expected: Vec<u8> = vec![
        0, // DesiredState::V1
        2, b'a', b'1', // agent_id
        3,    // generation
        0xd0, 0x0f, // issued_ms = 1000 (zigzag varint)
        1,    // one module
        1, b'm', 1, b'2', // name, version
    ];
    expected.extend([7u8; 32]); // sha256
    #[rustfmt::skip]
    expected.extend([
        0xac, 0x02,            // size = 300
        1, b's',               // signature
        2, b'{', b'}',         // config_json
        1, 1, 3, b't', b'/', b'#', // Some(["t/#"])
        9,                     // deployment
        60, 0,                 // probation: 60 s, 0 failed batches
    ]);
    assert_eq!(desired().encode(), expected);
    let DesiredState::V1(d) = desired() else { unreachable!() };
    assert_eq!(DesiredState::decode(&expected).unwrap(), d.into());

    let report = AgentReport::V1(ReportV1 {
        agent_id: "a1".into(),
        sent_ms: 1_000,
        generation: 3,
        modules: vec![ModuleReportV1 {
            name: "m".into(),
            deployment: 9,
            wanted: ModuleRef { name: "m".into(), version: "2".into(), sha256: [7; 32] },
            phase: Phase::RolledBack,
            running: None,
            error: "e".into(),
            batches_ok: 4,
            batches_failed: 1,
        }],
    });
    let mut expected: Vec<u8> = vec![0, 2, b'a', b'1', 0xd0, 0x0f, 3, 1, 1, b'm', 9, 1, b'm', 1, b'2'];
    expected.extend([7u8; 32]);
    expected.extend([5, 0, 1, b'e', 4, 1]); // RolledBack, None, "e", 4, 1
    assert_eq!(report.encode(), expected);
    let AgentReport::V1(r) = report else { unreachable!() };
    assert_eq!(AgentReport::decode(&expected).unwrap(), r.into());
}

#[test]
fn desired_state_refuses_what_an_agent_must_not_apply() {
    let check = |f: &dyn Fn(&mut DesiredV1), expect: &str| {
        let DesiredState::V1(mut d) = desired() else { unreachable!() };
        f(&mut d);
        let err = DesiredState::decode(&DesiredState::V1(d).encode()).unwrap_err().to_string();
        assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    };
    check(&|d| d.agent_id = "a/b".into(), "agent id");
    check(&|d| d.modules[0].module.name = "../etc".into(), "path separator");
    check(&|d| d.modules[0].module.name = "..".into(), "path separator");
    check(&|d| d.modules[0].module.version = "1\n".into(), "control character");
    check(&|d| d.modules.push(d.modules[0].clone()), "ascending");
    check(&|d| d.modules[0].inputs = Some(vec!["a/#/b".into()]), "module input");
    check(&|d| d.modules[0].config_json = "x".repeat(MAX_MODULE_CONFIG + 1), "module config");
    check(&|d| d.modules[0].signature = "x".repeat(MAX_SIGNATURE_TEXT + 1), "signature");
}

proptest! {
    #[test]
    fn control_plane_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = DesiredState::decode(&bytes);
        let _ = AgentReport::decode(&bytes);
        for kind in [HubKind::Ack, HubKind::Announcement, HubKind::Desired] {
            let _ = kind.signed_part(&bytes);
        }
    }
}

fn variant_batch() -> BatchV2 {
    let AgentMessage::BatchV2(mut b) = batch_v2() else { unreachable!() };
    b.streams[0].stream = variant_stream("s", &[0xab; 32]);
    b.losses[0].stream = variant_stream("s", &[0xab; 32]);
    b
}

/// Version 3 is version 2's fields under another variant index; only what names may be
/// differs.
#[test]
fn golden_bytes_batch_v3_and_variant_names() {
    let AgentMessage::BatchV2(plain) = batch_v2() else { unreachable!() };
    let mut expected = vec![2u8]; // AgentMessage::BatchV3
    expected.extend_from_slice(&AgentMessage::BatchV2(plain.clone()).encode()[1..]);
    assert_eq!(AgentMessage::BatchV3(plain.clone()).encode(), expected);
    assert_eq!(AgentMessage::decode_batch(&expected).unwrap(), plain);

    let v = variant_batch();
    assert_eq!(AgentMessage::for_batch(v.clone()), AgentMessage::BatchV3(v.clone()));
    assert_eq!(AgentMessage::for_batch(plain.clone()), AgentMessage::BatchV2(plain));
    assert_eq!(AgentMessage::decode_batch(&AgentMessage::BatchV3(v.clone()).encode()).unwrap(), v);
    assert_eq!(split_variant(&v.streams[0].stream), ("s", Some("ab".repeat(32).as_str())));
    assert_eq!(split_variant("s"), ("s", None));

    // Version 2 never carries variants.
    let err = AgentMessage::decode(&AgentMessage::BatchV2(v.clone()).encode()).unwrap_err().to_string();
    assert!(err.contains("MQTT wildcard"), "{err}");
    let check = |f: &dyn Fn(&mut BatchV2), want: &str| {
        let mut b = v.clone();
        f(&mut b);
        let err = AgentMessage::decode(&AgentMessage::BatchV3(b).encode()).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    };
    // The variant must be the chunk's own build.
    check(&|b| b.streams[0].stream = variant_stream("s", &[0xcd; 32]), "lineage naming that build");
    check(&|b| b.lineage.clear(), "lineage naming that build");
    check(&|b| b.streams[0].stream = format!("s#{}", "AB".repeat(32)), "lower-case hex");
    check(&|b| b.streams[0].stream = "s#ab".into(), "lower-case hex");
    check(&|b| b.streams[0].stream = format!("s+#{}", "ab".repeat(32)), "MQTT wildcard");
    check(&|b| b.losses[0].stream = "s#x".into(), "lower-case hex");
}

fn job() -> ReprocessJob {
    ReprocessJob {
        id: 4,
        module: ModuleRef { name: "m".into(), version: "3".into(), sha256: [8; 32] },
        size: 1,
        signature: "s".into(),
        config_json: "{}".into(),
        inputs: None,
        from_ns: 1,
        to_ns: 2,
    }
}

#[test]
fn golden_bytes_desired_v2_and_report_v2() {
    let DesiredState::V1(v1) = desired() else { unreachable!() };
    let mut d = Desired::from(v1.clone());
    // Without jobs the message stays version 1, byte for byte.
    assert_eq!(DesiredState::for_desired(d.clone()), DesiredState::V1(v1.clone()));
    d.reprocess.push(job());
    d.modules[0].checks = Checks { max_output_change_pct: Some(50), max_failed_pct: None, min_inputs: 100 };
    let mut expected = vec![1u8]; // DesiredState::V2
    expected.extend_from_slice(&desired().encode()[1..]); // the V1 fields
    expected.extend([1, 50, 0, 100]); // checks: Some(50), None, 100
    expected.push(0); // shadow: false
    #[rustfmt::skip]
    expected.extend([
        1,                        // one job
        4,                        // id
        1, b'm', 1, b'3',         // name, version
    ]);
    expected.extend([8u8; 32]);
    expected.extend([1, 1, b's', 2, b'{', b'}', 0, 2, 4]); // size, signature, config, None, from 1, to 2 (zigzag)
    assert_eq!(DesiredState::for_desired(d.clone()).encode(), expected);
    assert_eq!(DesiredState::decode(&expected).unwrap(), d);

    let check = |f: &dyn Fn(&mut Desired), expect: &str| {
        let mut d = d.clone();
        f(&mut d);
        let err = DesiredState::decode(&DesiredState::V2(d).encode()).unwrap_err().to_string();
        assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    };
    check(&|d| d.reprocess.push(job()), "ascending");
    check(&|d| d.reprocess[0].to_ns = 1, "not before");
    check(&|d| d.reprocess[0].module.name = "#x".into(), "reserved");
    check(&|d| d.reprocess[0].inputs = Some(vec!["#/a".into()]), "module input");
    check(&|d| d.modules[0].checks.max_failed_pct = Some(2_000_000), "module checks");
    // Checks alone make a version 2 message.
    let mut only_checks = d.clone();
    only_checks.reprocess.clear();
    assert!(matches!(DesiredState::for_desired(only_checks.clone()), DesiredState::V2(_)));
    only_checks.modules[0].checks = Checks::default();
    assert!(matches!(DesiredState::for_desired(only_checks), DesiredState::V1(_)));

    let r = Report {
        agent_id: "a1".into(),
        sent_ms: 1,
        generation: 2,
        modules: Vec::new(),
        jobs: vec![JobReport {
            id: 4,
            phase: JobPhase::Done,
            readings_in: 10,
            readings_out: 3,
            batches_failed: 0,
            error: String::new(),
        }],
    };
    let expected: Vec<u8> = vec![1, 2, b'a', b'1', 2, 2, 0, 1, 4, 3, 10, 3, 0, 0];
    assert_eq!(AgentReport::for_report(r.clone()).encode(), expected);
    assert_eq!(AgentReport::decode(&expected).unwrap(), r);
    // A shadow comparison makes a version 2 report too, and round-trips.
    let mut shadowed = r.clone();
    shadowed.jobs.clear();
    shadowed.modules.push(ModuleReport {
        name: "m".into(),
        deployment: 9,
        wanted: ModuleRef { name: "m".into(), version: "2".into(), sha256: [7; 32] },
        phase: Phase::Canary,
        running: None,
        error: String::new(),
        batches_ok: 1,
        batches_failed: 0,
        shadow: Some(ShadowReport {
            inputs: 10,
            outputs: 9,
            running_outputs: 10,
            failed_batches: 0,
            last_error: String::new(),
            max_mean_drift_pct: Some(3),
        }),
    });
    assert!(matches!(AgentReport::for_report(shadowed.clone()), AgentReport::V2(_)));
    assert_eq!(AgentReport::decode(&AgentReport::for_report(shadowed.clone()).encode()).unwrap(), shadowed);
    let mut no_jobs = r.clone();
    no_jobs.jobs.clear();
    assert!(matches!(AgentReport::for_report(no_jobs.clone()), AgentReport::V1(_)));
    assert_eq!(AgentReport::decode(&AgentReport::for_report(no_jobs.clone()).encode()).unwrap(), no_jobs);
    for p in [JobPhase::Pending, JobPhase::Downloading, JobPhase::Running, JobPhase::Done, JobPhase::Failed] {
        assert_eq!(JobPhase::parse(p.as_str()), Some(p));
    }
}
