//! `shoal trace ID`: one trace from the control plane's collector, printed as a
//! waterfall: every span under its parent, with its offset, its duration and a bar
//! on a common time axis.

use clap::{Arg, ArgAction, ArgMatches, Command};
use shoal_core::Error;
use shoal_discovery::{RegistryClient, SpanView, TraceView};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Width of the bar column, in characters.
const BAR: usize = 40;
/// Deepest indentation shown; deeper spans line up at this depth.
const MAX_DEPTH: usize = 16;

/// The `trace` subcommand; `system` and `registry` find the control plane the way
/// `shoal status` does.
pub(crate) fn command(system: Arg, registry: Arg) -> Command {
    Command::new("trace")
        .about("Print one trace (every span of a request, in every process) as a waterfall")
        .long_about(
            "Print one trace from the control plane's trace collector as a waterfall: \
             every span under the span that caused it, its start (from the trace's \
             first span), its duration, and a bar on a common time axis. Failed spans \
             are marked `!` with their message. The trace id is the `trace_id` of a \
             log line (shoal logs --trace ID shows the same request's logs) or the \
             middle part of a `traceparent` header.",
        )
        .arg(system)
        .arg(registry)
        .arg(
            Arg::new("id")
                .required(true)
                .value_name("TRACE_ID")
                .help("32 hex digits"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print the spans as JSON, one per line"),
        )
}

/// Run `shoal trace`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let (url, _) = crate::status::registry_url(m);
    let id = m
        .get_one::<String>("id")
        .ok_or_else(|| Error::config("missing TRACE_ID; see shoal trace --help"))?;
    let client = RegistryClient::new(&url)?;
    let trace = client
        .trace(id)
        .await
        .map_err(|e| crate::chaos::unreachable_hint(&url, e))?;
    if m.get_flag("json") {
        for s in &trace.spans {
            println!("{}", span_json(s));
        }
    } else {
        print!("{}", waterfall(&trace));
    }
    Ok(())
}

fn span_json(s: &SpanView) -> serde_json::Value {
    serde_json::json!({
        "span_id": s.span_id, "parent_span_id": s.parent_span_id, "name": s.name,
        "kind": s.kind, "service": s.service, "instance": s.instance,
        "start_unix_nanos": s.start_unix_nanos, "end_unix_nanos": s.end_unix_nanos,
        "status": s.status, "status_message": s.status_message, "attributes": s.attributes,
    })
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// The waterfall text of `trace`.
pub(crate) fn waterfall(trace: &TraceView) -> String {
    let mut out = String::new();
    let spans = &trace.spans;
    let t0 = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let t1 = spans.iter().map(|s| s.end_unix_nanos).max().unwrap_or(t0);
    let total = t1.saturating_sub(t0).max(1);
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    let _ = writeln!(
        out,
        "trace {}: {} spans, {} services, {:.2} ms",
        trace.trace_id,
        spans.len(),
        services.len(),
        ms(total)
    );
    if trace.spans_not_kept > 0 {
        let _ = writeln!(
            out,
            "({} more spans were received and not kept: the trace is over the collector's limit)",
            trace.spans_not_kept
        );
    }
    let _ = writeln!(
        out,
        "{:>10} {:>10}  {:<16} {:<48} |{}|",
        "start",
        "duration",
        "service",
        "span",
        " ".repeat(BAR)
    );

    // Children by parent, each list by start; a span whose parent is missing (not
    // received, or in a process that does not trace) is shown as a root.
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanView>> = HashMap::new();
    let mut roots: Vec<&SpanView> = Vec::new();
    for s in spans {
        match s.parent_span_id.as_deref() {
            Some(p) if ids.contains(p) && p != s.span_id => children.entry(p).or_default().push(s),
            _ => roots.push(s),
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| s.start_unix_nanos);
    }
    roots.sort_by_key(|s| s.start_unix_nanos);
    // Depth first, with an explicit stack: a malformed trace cannot recurse deep.
    let mut stack: Vec<(&SpanView, usize)> = roots.into_iter().rev().map(|s| (s, 0)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some((s, depth)) = stack.pop() {
        if !seen.insert(s.span_id.as_str()) {
            continue;
        }
        let start = s.start_unix_nanos.saturating_sub(t0);
        let dur = s.end_unix_nanos.saturating_sub(s.start_unix_nanos);
        let from = (start as u128 * BAR as u128 / total as u128) as usize;
        let len = ((dur as u128 * BAR as u128).div_ceil(total as u128) as usize).max(1);
        let from = from.min(BAR - 1);
        let len = len.min(BAR - from);
        let bar = format!(
            "{}{}{}",
            " ".repeat(from),
            "█".repeat(len),
            " ".repeat(BAR - from - len)
        );
        let mark = if s.status == "error" { "! " } else { "" };
        let label = format!(
            "{}{mark}{} ({})",
            "  ".repeat(depth.min(MAX_DEPTH)),
            s.name,
            s.kind
        );
        let label: String = label.chars().take(48).collect();
        let _ = writeln!(
            out,
            "{:>8.2}ms {:>8.2}ms  {:<16} {:<48} |{bar}|",
            ms(start),
            ms(dur),
            s.instance.chars().take(16).collect::<String>(),
            label
        );
        if let Some(m) = &s.status_message {
            let _ = writeln!(
                out,
                "{:>22}  {}  ! {m}",
                "",
                "  ".repeat(depth.min(MAX_DEPTH))
            );
        }
        if let Some(kids) = children.get(s.span_id.as_str()) {
            for k in kids.iter().rev() {
                stack.push((k, depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, name: &str, start: u64, end: u64) -> SpanView {
        SpanView {
            span_id: id.into(),
            parent_span_id: parent.map(str::to_string),
            name: name.into(),
            kind: "server".into(),
            service: name.split(' ').next().unwrap_or("").into(),
            instance: format!("{}-1", name.split(' ').next().unwrap_or("")),
            start_unix_nanos: start,
            end_unix_nanos: end,
            status: if name.contains("fail") {
                "error".into()
            } else {
                "ok".into()
            },
            status_message: name.contains("fail").then(|| "answered 503".into()),
            attributes: Default::default(),
        }
    }

    #[test]
    fn children_follow_their_parent_indented_with_bars_on_one_axis() {
        let trace = TraceView {
            trace_id: "ab".repeat(16),
            // Out of order on purpose: the collector sorts by start, not by tree.
            spans: vec![
                span(
                    "c",
                    Some("b"),
                    "orders POST /api/orders",
                    2_000_000,
                    8_000_000,
                ),
                span("a", None, "gateway POST /api/orders", 0, 10_000_000),
                span("d", Some("a"), "payments fail", 8_000_000, 9_000_000),
                span("b", Some("a"), "gateway POST orders", 1_000_000, 9_000_000),
                span(
                    "x",
                    Some("missing"),
                    "shipping orphan",
                    9_000_000,
                    10_000_000,
                ),
            ],
            spans_not_kept: 0,
        };
        let text = waterfall(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("5 spans, 4 services, 10.00 ms"), "{text}");
        let order: Vec<&str> = lines[2..]
            .iter()
            .filter(|l| !l.trim_start().starts_with('!'))
            .map(|l| l.split("  ").find(|p| p.contains('(')).unwrap_or("").trim())
            .collect();
        assert_eq!(order.len(), 5, "{text}");
        // a, then b (starts before d) with its child c, then d; the orphan last.
        assert!(lines[2].contains("gateway POST /api/orders"), "{text}");
        assert!(lines[3].contains("  gateway POST orders"), "{text}");
        assert!(lines[4].contains("    orders POST /api/orders"), "{text}");
        assert!(lines[5].contains("! payments fail"), "{text}");
        assert!(lines[6].contains("! answered 503"), "{text}");
        assert!(lines[7].contains("shipping orphan"), "{text}");
        // The root's bar fills the axis; the child's starts a fifth of the way in.
        let bar = |l: &str| l.split('|').nth(1).unwrap_or("").to_string();
        assert_eq!(bar(lines[2]).chars().filter(|c| *c == '█').count(), BAR);
        assert_eq!(bar(lines[4]).chars().take_while(|c| *c == ' ').count(), 8);
    }
}
