use super::*;

fn rec(raw: &str) -> Record {
    Record::parse(raw.to_string(), "catalog-1", 7)
}

#[test]
fn rfc3339_both_ways() {
    for ms in [0, 951_782_400_123, 1_795_444_158_000, 1_795_444_158_999] {
        let text = crate::logging::rfc3339(ms);
        assert_eq!(parse_rfc3339(&text), Some(ms), "{text}");
    }
    assert_eq!(
        parse_rfc3339("2026-11-23T16:29:18+02:00"),
        Some(1_795_444_158_000)
    );
    assert_eq!(
        parse_rfc3339("2026-11-23T14:29:18.5Z"),
        Some(1_795_444_158_500)
    );
    for bad in [
        "",
        "2026-11-23",
        "2026-13-23T14:29:18Z",
        "2026-11-23T14:29:18",
        "yesterday",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad}");
    }
}

#[test]
fn since_takes_a_time_or_a_time_ago() {
    let now = 10 * 86_400_000;
    assert_eq!(parse_since("10m", now), Ok(now - 600_000));
    assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
    assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
    assert_eq!(parse_since("90s", now), Ok(now - 90_000));
    assert_eq!(parse_since("1970-01-01T00:00:01Z", now), Ok(1000));
    assert!(parse_since("10 minutes", now).is_err());
    assert!(parse_since("m", now).is_err());
}

#[test]
fn records_parse_and_print_compactly() {
    let r = rec(
        r#"{"ts":"2026-11-23T14:29:18.123Z","level":"WARN","service":"catalog","instance":"catalog-1","target":"x","message":"upstream failed","status":503,"request_id":"r-1","error":"connection refused"}"#,
    );
    assert_eq!(r.ts_ms, 1_795_444_158_123);
    assert_eq!(
        r.human(),
        r#"2026-11-23T14:29:18.123Z WARN  catalog/catalog-1 upstream failed error="connection refused" request_id=r-1 status=503"#
    );
    // Not JSON: the time of the line before, shown as it is after the process.
    let panic = rec("thread 'main' panicked at src/main.rs:3:5:");
    assert_eq!(panic.ts_ms, 7);
    assert!(panic.json.is_none());
    assert_eq!(
        panic.human(),
        "catalog-1 | thread 'main' panicked at src/main.rs:3:5:"
    );
    // A JSON value that is not an object is not a log record either.
    assert!(rec("42").json.is_none());
}

#[test]
fn filters() {
    let debug = rec(
        r#"{"ts":"2026-11-23T14:29:18.000Z","level":"DEBUG","message":"cache miss","key":"p-1"}"#,
    );
    let warn = rec(
        r#"{"ts":"2026-11-23T14:29:19.000Z","level":"WARN","message":"slow","trace_id":"abc","ms":812}"#,
    );
    let panic = rec("thread 'main' panicked");
    let f = Filter {
        min_level: level_rank("info"),
        ..Filter::default()
    };
    assert!(!f.matches(&debug) && f.matches(&warn) && f.matches(&panic));
    let f = Filter {
        trace: Some("abc".into()),
        ..Filter::default()
    };
    assert!(!f.matches(&debug) && f.matches(&warn) && !f.matches(&panic));
    let f = Filter {
        since_ms: parse_rfc3339("2026-11-23T14:29:19Z"),
        ..Filter::default()
    };
    assert!(!f.matches(&debug) && f.matches(&warn));
    // Any field's value, numbers included; the panic's text.
    for (g, d, w, p) in [
        ("p-1", true, false, false),
        ("812", false, true, false),
        ("panicked", false, false, true),
        ("miss", true, false, false),
    ] {
        let f = Filter {
            grep: Some(g.into()),
            ..Filter::default()
        };
        assert_eq!(
            (f.matches(&debug), f.matches(&warn), f.matches(&panic)),
            (d, w, p),
            "{g}"
        );
    }
}

#[test]
fn a_service_selects_its_replicas_and_versions() {
    let entries = vec!["catalog".to_string(), "catalog-v2".to_string()];
    assert!(selected("catalog-1", "catalog", &entries));
    assert!(selected("catalog-v2-3", "catalog", &entries));
    assert!(!selected("catalog-v2", "catalog", &[]));
    assert!(!selected("catalogue-1", "catalog", &entries));
    assert!(selected("gateway", "gateway", &[]));
    assert!(!selected("gateway", "catalog", &entries));
}

fn line(ts_ms: u64, service: &str, msg: &str) -> String {
    format!(
        "{}\n",
        serde_json::json!({"ts": crate::logging::rfc3339(ts_ms), "level": "INFO", "service": service, "message": msg})
    )
}

#[test]
fn streams_merge_in_time_order_across_rotated_files() {
    let dir = std::env::temp_dir().join(format!("shoal-logread-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // catalog-1: rotated .2 (oldest), .1, then live; gateway: live only, and a
    // panic line with no newline at its end.
    std::fs::write(dir.join("catalog-1.log.2"), line(1_000, "catalog", "c1")).unwrap();
    std::fs::write(
        dir.join("catalog-1.log.1"),
        [line(3_000, "catalog", "c3"), line(5_000, "catalog", "c5")].concat(),
    )
    .unwrap();
    std::fs::write(dir.join("catalog-1.log"), line(6_000, "catalog", "c6")).unwrap();
    std::fs::write(
        dir.join("gateway.log"),
        [
            line(2_000, "gateway", "g2"),
            line(4_000, "gateway", "g4"),
            "thread panicked".into(),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not a log").unwrap();
    let groups = process_files(&dir).unwrap();
    let names: Vec<_> = groups
        .iter()
        .map(|(p, _, f)| (p.as_str(), f.len()))
        .collect();
    assert_eq!(names, [("catalog-1", 3), ("gateway", 1)]);
    let mut streams: Vec<_> = groups
        .into_iter()
        .map(|(p, live, files)| Stream::new(p, live, files))
        .collect();
    let mut got = Vec::new();
    merge(&mut streams, true, |r| {
        got.push(match &r.json {
            Some(m) => m["message"].as_str().unwrap().to_string(),
            None => r.human(),
        })
    });
    assert_eq!(
        got,
        [
            "c1",
            "g2",
            "c3",
            "g4",
            "gateway | thread panicked",
            "c5",
            "c6"
        ]
    );

    // Following: nothing new, then a line appended, then the live file rotated
    // away with a line at its end and a new one started.
    let mut streams: Vec<_> = process_files(&dir)
        .unwrap()
        .into_iter()
        .filter(|(p, _, _)| p == "catalog-1")
        .map(|(p, live, files)| Stream::new(p, live, files))
        .collect();
    merge(&mut streams, false, |_| {});
    let s = &mut streams[0];
    s.check_rotation();
    assert!(s.next_line(false).is_none());
    let live = dir.join("catalog-1.log");
    let append = |text: String| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&live)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    };
    append(line(7_000, "catalog", "c7"));
    s.check_rotation();
    assert_eq!(s.next_line(false).unwrap().ts_ms, 7_000);
    append(line(8_000, "catalog", "c8"));
    std::fs::rename(&live, dir.join("catalog-1.log.1")).unwrap();
    std::fs::write(&live, line(9_000, "catalog", "c9")).unwrap();
    s.check_rotation();
    let next: Vec<_> = std::iter::from_fn(|| s.next_line(false))
        .map(|r| r.ts_ms)
        .collect();
    assert_eq!(next, [8_000, 9_000]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tail_keeps_the_last_matches_and_counts_what_it_hid() {
    let dir = std::env::temp_dir().join(format!("shoal-logread-tail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("catalog-1.log"),
        [
            line(1_000, "catalog", "a"),
            "panicked\n".into(),
            line(3_000, "catalog", "b"),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(dir.join("gateway.log"), line(2_000, "gateway", "g")).unwrap();
    let messages = |t: &Tail| -> Vec<String> {
        t.records
            .iter()
            .map(|r| {
                r.json()
                    .map_or("-", |m| m["message"].as_str().unwrap())
                    .to_string()
            })
            .collect()
    };
    let mut all = streams(&dir, |_| true).unwrap();
    let t = tail(&mut all, &Filter::default(), true, 2);
    assert_eq!(messages(&t), ["g", "b"]);
    assert_eq!((t.earlier, t.hidden_text), (2, 0));
    let mut catalog = streams(&dir, |p| selected(p, "catalog", &[])).unwrap();
    let grep = |g: &str| Filter {
        grep: Some(g.into()),
        ..Filter::default()
    };
    let t = tail(&mut catalog, &grep("panic"), true, 10);
    assert_eq!(messages(&t), ["-"]);
    assert_eq!(t.hidden_text, 0);
    let mut catalog = streams(&dir, |p| selected(p, "catalog", &[])).unwrap();
    let t = tail(&mut catalog, &grep("b"), true, 10);
    assert_eq!(messages(&t), ["b"]);
    assert_eq!(t.hidden_text, 1, "the panic line, hidden, is counted");
    let mut catalog = streams(&dir, |p| selected(p, "catalog", &[])).unwrap();
    let trace = Filter {
        trace: Some("t".into()),
        ..Filter::default()
    };
    let t = tail(&mut catalog, &trace, true, 10);
    assert!(t.records.is_empty());
    assert_eq!(t.hidden_text, 1);
    let _ = std::fs::remove_dir_all(&dir);
}
