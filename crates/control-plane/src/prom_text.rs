//! A parser of the Prometheus text exposition format (0.0.4) and of OpenMetrics text,
//! for the scraper ([`crate::scrape`]).
//!
//! It reads samples only: `name{label="value",…} value [timestamp] [# exemplar]`.
//! Comment lines (`# HELP`, `# TYPE`, `# UNIT`) and blank lines are skipped, and
//! `# EOF` ends the exposition. It is strict about what it reads (names, quoting,
//! escapes, numbers), so a malformed line is an error naming its line number rather
//! than a sample with a wrong value: the scraper counts such a target as failed.

/// Most samples read from one exposition: a bound on memory besides the body limit.
pub(crate) const MAX_SAMPLES: usize = 200_000;

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample {
    /// The series name as exposed (`shoal_http_server_requests_total`).
    pub(crate) name: String,
    /// The labels in the order written.
    pub(crate) labels: Vec<(String, String)>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub(crate) value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub(crate) fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A line the parser could not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub(crate) struct ParseError {
    /// 1-based line number.
    pub(crate) line: usize,
    /// What was wrong.
    pub(crate) message: String,
}

/// Every sample of `text`, in order.
pub(crate) fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            if comment.trim() == "EOF" {
                break;
            }
            continue;
        }
        if out.len() == MAX_SAMPLES {
            return Err(ParseError {
                line: line_no,
                message: format!("more than {MAX_SAMPLES} samples"),
            });
        }
        let sample = Line::new(trimmed).sample().map_err(|message| ParseError {
            line: line_no,
            message,
        })?;
        out.push(sample);
    }
    Ok(out)
}

/// A cursor over one sample line.
struct Line<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Line<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_spaces(&mut self) -> bool {
        let before = self.pos;
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
        self.pos > before
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*` (or without `:` for label names).
    fn name(&mut self, colons: bool, what: &str) -> Result<&'a str, String> {
        let start = self.pos;
        for (i, c) in self.rest().char_indices() {
            let ok = c.is_ascii_alphabetic()
                || c == '_'
                || (colons && c == ':')
                || (i > 0 && c.is_ascii_digit());
            if !ok {
                break;
            }
            self.pos = start + i + c.len_utf8();
        }
        if self.pos == start {
            return Err(format!("expected a {what} at column {}", start + 1));
        }
        Ok(&self.s[start..self.pos])
    }

    /// A double-quoted label value with `\\`, `\"` and `\n` escapes.
    fn quoted(&mut self) -> Result<String, String> {
        if self.peek() != Some('"') {
            return Err(format!(
                "expected a quoted label value at column {}",
                self.pos + 1
            ));
        }
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, other)) => return Err(format!("unknown escape \\{other}")),
                    None => break,
                },
                '\n' => break,
                c => out.push(c),
            }
        }
        Err("unterminated label value".into())
    }

    fn labels(&mut self) -> Result<Vec<(String, String)>, String> {
        let mut labels = Vec::new();
        // Past the `{`.
        self.pos += 1;
        loop {
            self.skip_spaces();
            if self.peek() == Some('}') {
                self.pos += 1;
                return Ok(labels);
            }
            let name = self.name(false, "label name")?.to_owned();
            self.skip_spaces();
            if self.peek() != Some('=') {
                return Err(format!("expected '=' after label {name}"));
            }
            self.pos += 1;
            self.skip_spaces();
            let value = self.quoted()?;
            if labels.iter().any(|(k, _)| *k == name) {
                return Err(format!("label {name} given twice"));
            }
            labels.push((name, value));
            self.skip_spaces();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(format!("expected ',' or '}}' at column {}", self.pos + 1)),
            }
        }
    }

    /// The next token up to a space or the end.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        let len = self.rest().find([' ', '\t']).unwrap_or(self.rest().len());
        self.pos += len;
        &self.s[start..self.pos]
    }

    fn sample(mut self) -> Result<Sample, String> {
        let name = self.name(true, "metric name")?.to_owned();
        let labels = if self.peek() == Some('{') {
            self.labels()?
        } else {
            Vec::new()
        };
        if !self.skip_spaces() {
            return Err(format!(
                "expected a space before the value of {name} at column {}",
                self.pos + 1
            ));
        }
        let raw = self.token();
        let value = number(raw).ok_or_else(|| format!("{name}: {raw:?} is not a number"))?;
        self.skip_spaces();
        // An optional timestamp, then an optional OpenMetrics exemplar.
        if !self.rest().is_empty() && !self.rest().starts_with('#') {
            let ts = self.token();
            if number(ts).is_none_or(|t| !t.is_finite()) {
                return Err(format!("{name}: {ts:?} is not a timestamp"));
            }
            self.skip_spaces();
        }
        if !self.rest().is_empty() && !self.rest().starts_with('#') {
            return Err(format!(
                "{name}: unexpected {:?} after the value",
                self.rest()
            ));
        }
        Ok(Sample {
            name,
            labels,
            value,
        })
    }
}

/// A sample value: a decimal or exponent number, `+Inf`, `-Inf`, `Inf` or `NaN`.
fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => return Some(f64::INFINITY),
        "-Inf" | "-inf" => return Some(f64::NEG_INFINITY),
        "NaN" | "nan" => return Some(f64::NAN),
        _ => {}
    }
    // Rust's parser would also take "infinity" and friends; numbers only here.
    let numeric = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !numeric {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Sample {
        let mut v = parse(line).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn reads_an_openmetrics_exposition_of_prometheus_client() {
        let text = "\
# HELP shoal_http_server_requests HTTP requests served.
# TYPE shoal_http_server_requests counter
shoal_http_server_requests_total{service=\"catalog\",route=\"/api/products/{id}\",method=\"GET\",status=\"200\"} 3
shoal_http_server_requests_created{service=\"catalog\"} 1.7647e9
# TYPE shoal_http_server_request_duration_seconds histogram
shoal_http_server_request_duration_seconds_bucket{service=\"catalog\",le=\"0.0005\"} 0
shoal_http_server_request_duration_seconds_bucket{service=\"catalog\",le=\"+Inf\"} 3
shoal_http_server_requests_in_flight{service=\"catalog\"} 0
# EOF
this is past the end and never read
";
        let v = parse(text).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[0].name, "shoal_http_server_requests_total");
        assert_eq!(v[0].label("route"), Some("/api/products/{id}"));
        assert_eq!(v[0].label("status"), Some("200"));
        assert_eq!(v[0].value, 3.0);
        assert_eq!(v[1].value, 1.7647e9);
        assert_eq!(v[3].label("le"), Some("+Inf"));
        assert_eq!(v[4].labels.len(), 1);
    }

    #[test]
    fn reads_the_text_format_with_timestamps_escapes_and_special_values() {
        let s = one("up 1 1764700000000");
        assert_eq!((s.name.as_str(), s.value), ("up", 1.0));
        assert!(s.labels.is_empty());
        let s = one(r#"m{a="x\"y\\z\nw", b = "" ,} -Inf"#);
        assert_eq!(s.label("a"), Some("x\"y\\z\nw"));
        assert_eq!(s.label("b"), Some(""));
        assert_eq!(s.value, f64::NEG_INFINITY);
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m +Inf").value, f64::INFINITY);
        assert_eq!(one("ns:m_total 1e-3").value, 0.001);
        assert_eq!(one("m{} 2").value, 2.0);
        // An OpenMetrics exemplar after the value.
        assert_eq!(
            one(r#"m_bucket{le="1"} 4 # {trace_id="abc"} 0.5"#).value,
            4.0
        );
        // Windows line ends and leading blanks.
        assert_eq!(parse("\r\n  m 1\r\n").unwrap()[0].value, 1.0);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let cases = [
            ("m\n", "expected a space before the value of m"),
            ("m abc\n", "\"abc\" is not a number"),
            ("m infinity\n", "\"infinity\" is not a number"),
            ("m{a=\"1\" 2\n", "expected ',' or '}'"),
            ("m{a=1} 2\n", "expected a quoted label value"),
            ("m{a=\"1} 2\n", "unterminated label value"),
            ("m{a=\"\\t\"} 2\n", "unknown escape \\t"),
            ("m{a=\"1\",a=\"2\"} 2\n", "label a given twice"),
            ("m{1a=\"1\"} 2\n", "expected a label name"),
            ("9m 2\n", "expected a metric name"),
            ("m 1 2 3\n", "unexpected \"3\" after the value"),
            ("m 1 x\n", "\"x\" is not a timestamp"),
            ("m{a\"1\"} 1\n", "expected '=' after label a"),
        ];
        for (text, want) in cases {
            let err = parse(&format!("ok 1\n{text}")).unwrap_err();
            assert_eq!(err.line, 2, "{text:?}: {err}");
            assert!(err.message.contains(want), "{text:?}: {err}");
            assert!(err.to_string().starts_with("line 2: "), "{err}");
        }
    }

    #[test]
    fn an_empty_body_has_no_samples() {
        assert_eq!(parse("").unwrap(), []);
        assert_eq!(parse("# EOF\n").unwrap(), []);
    }
}
