//! Reading the JSONL file: counting its lines, classifying each one, and
//! cutting them into batches.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::protocol::{self, Input, Limits};

use super::BadLine;

/// Bad lines kept in the summary and printed; further ones are only counted.
const SHOWN_BAD_LINES: usize = 100;

/// What the file scan found.
pub(super) struct Scan {
    pub(super) len: u64,
    pub(super) lines: u64,
    /// Newlines before `offset`.
    pub(super) newlines_before: u64,
    /// The byte at `offset - 1`.
    pub(super) byte_before: Option<u8>,
}

/// Counts the file's lines, and checks where `offset` falls.
pub(super) fn scan(path: &Path, offset: u64) -> std::io::Result<Scan> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut scan = Scan {
        len: 0,
        lines: 0,
        newlines_before: 0,
        byte_before: None,
    };
    let mut newlines = 0u64;
    let mut last = None;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        let start = scan.len;
        let end = start + n as u64;
        if offset > start && offset <= end {
            let before = (offset - start) as usize;
            scan.byte_before = chunk.get(before - 1).copied();
            scan.newlines_before =
                newlines + chunk[..before].iter().filter(|b| **b == b'\n').count() as u64;
        }
        newlines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        last = chunk.last().copied();
        scan.len = end;
    }
    scan.lines = newlines + u64::from(last.is_some_and(|b| b != b'\n'));
    Ok(scan)
}

/// Inputs that can share a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    pub(super) model: String,
    pub(super) dimensions: Option<u32>,
}

/// Consecutive lines: the inputs they hold, and where they end.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) seq: u64,
    /// 1-based.
    pub(super) first_line: u64,
    pub(super) last_line: u64,
    /// Byte offset just past the last line.
    pub(super) end: u64,
    pub(super) group: Option<Group>,
    pub(super) inputs: Vec<Input>,
}

impl Batch {
    pub(super) fn lines(&self) -> u64 {
        (self.last_line + 1).saturating_sub(self.first_line)
    }
}

/// One classified line.
#[derive(Debug, PartialEq)]
enum Line {
    Blank,
    Bad(String),
    Input(Group, Input),
}

/// Reports bad lines (above the progress bar) and keeps the first ones.
pub(super) struct BadLines {
    pub(super) bar: ProgressBar,
    pub(super) file: PathBuf,
    pub(super) count: u64,
    pub(super) shown: Vec<BadLine>,
}

impl BadLines {
    fn add(&mut self, line: u64, reason: String) {
        self.count += 1;
        if self.shown.len() < SHOWN_BAD_LINES {
            self.bar.suspend(|| {
                eprintln!("{}:{line}: {reason}; skipped", self.file.display());
                if self.shown.len() + 1 == SHOWN_BAD_LINES {
                    eprintln!(
                        "{}: further bad lines are counted but not shown",
                        self.file.display()
                    );
                }
            });
            self.shown.push(BadLine { line, reason });
        }
    }
}

/// Reads lines and cuts them into batches.
pub(super) struct Batcher {
    pub(super) reader: BufReader<tokio::fs::File>,
    /// Byte offset of the next line.
    pub(super) offset: u64,
    /// Lines read so far (from the file's start).
    pub(super) line: u64,
    pub(super) buf: Vec<u8>,
    /// Longer lines are bad, and not held in memory.
    pub(super) max_line: usize,
    /// The server's request limits, for what a line holds.
    pub(super) limits: Limits,
    pub(super) defaults: Group,
    pub(super) batch: usize,
    pub(super) seq: u64,
    /// The batch being filled.
    pub(super) open: Option<Batch>,
    pub(super) eof: bool,
    /// A batch ends at this byte offset at the latest (a line boundary),
    /// and reading stops there until it is moved.
    pub(super) until: u64,
    pub(super) report: BadLines,
}

impl Batcher {
    /// The next batch; `None` once the file is exhausted.
    pub(super) async fn next(&mut self) -> std::io::Result<Option<Batch>> {
        loop {
            if self.eof
                || self.offset >= self.until
                || self
                    .open
                    .as_ref()
                    .is_some_and(|b| b.inputs.len() >= self.batch)
            {
                return Ok(self.open.take());
            }
            let (consumed, truncated) = self.read_line().await?;
            if consumed == 0 {
                self.eof = true;
                continue;
            }
            self.offset += consumed;
            self.line += 1;
            let parsed = if truncated {
                Line::Bad(format!("longer than {} bytes", self.max_line))
            } else {
                let mut bytes = self.buf.as_slice();
                if self.line == 1 {
                    bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                }
                parse_line(bytes, &self.defaults, &self.limits)
            };
            let (group, input) = match parsed {
                Line::Input(group, input) => (group, input),
                Line::Blank => {
                    self.extend();
                    continue;
                }
                Line::Bad(reason) => {
                    self.report.add(self.line, reason);
                    self.extend();
                    continue;
                }
            };
            let switch = self
                .open
                .as_ref()
                .and_then(|b| b.group.as_ref())
                .is_some_and(|g| *g != group);
            let ready = if switch { self.open.take() } else { None };
            let open = self.extend();
            open.group = Some(group);
            open.inputs.push(input);
            if ready.is_some() {
                return Ok(ready);
            }
        }
    }

    /// Adds the line just read to the open batch (opening one if needed).
    fn extend(&mut self) -> &mut Batch {
        let (line, end) = (self.line, self.offset);
        let seq = &mut self.seq;
        let batch = self.open.get_or_insert_with(|| {
            *seq += 1;
            Batch {
                seq: *seq - 1,
                first_line: line,
                last_line: line,
                end,
                group: None,
                inputs: Vec::new(),
            }
        });
        batch.last_line = line;
        batch.end = end;
        batch
    }

    /// Reads one line into `buf` (at most `max_line` bytes of it); returns
    /// the bytes consumed, 0 at the end of the file, and whether it was cut.
    async fn read_line(&mut self) -> std::io::Result<(u64, bool)> {
        self.buf.clear();
        let mut consumed = 0u64;
        let mut truncated = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok((consumed, truncated));
            }
            let (take, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            let room = self.max_line.saturating_sub(self.buf.len());
            if take > room {
                truncated = true;
            }
            self.buf.extend_from_slice(&available[..take.min(room)]);
            self.reader.consume(take);
            consumed += take as u64;
            if done {
                return Ok((consumed, truncated));
            }
        }
    }
}

/// Classifies one line (without its newline, or with it: whitespace is
/// trimmed).
fn parse_line(raw: &[u8], defaults: &Group, limits: &Limits) -> Line {
    let text = raw.trim_ascii();
    if text.is_empty() {
        return Line::Blank;
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return Line::Bad(format!("not JSON ({e})")),
    };
    match interpret(value, defaults, limits) {
        Ok((group, input)) => Line::Input(group, input),
        Err(reason) => Line::Bad(reason),
    }
}

fn interpret(value: Value, defaults: &Group, limits: &Limits) -> Result<(Group, Input), String> {
    let (input, model, dimensions) = match value {
        Value::Object(mut fields) => {
            let input = fields
                .remove("input")
                .ok_or("no \"input\" field".to_owned())?;
            let model = match fields.remove("model") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) if !m.is_empty() => {
                    protocol::check_model(&m, limits).map_err(|e| e.message)?;
                    Some(m)
                }
                Some(_) => return Err("\"model\" must be a non-empty string".into()),
            };
            let dimensions = match fields.remove("dimensions") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|d| u32::try_from(d).ok())
                        .filter(|d| *d > 0)
                        .ok_or("\"dimensions\" must be a positive integer".to_owned())?,
                ),
            };
            if let Some(name) = fields.keys().next() {
                return Err(format!(
                    "unknown field {name:?} (a line has \"input\", and may have \"model\" and \
                     \"dimensions\")"
                ));
            }
            (input, model, dimensions)
        }
        other => (other, None, None),
    };
    let input = match input {
        Value::String(s) if s.is_empty() => return Err("empty input".into()),
        Value::String(s) => Input::Text(s),
        Value::Array(items) if items.is_empty() => return Err("empty input".into()),
        Value::Array(items) => Input::Tokens(
            items
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or(
                    "an input array must hold token ids (integers below 2^32); one input per line"
                        .to_owned(),
                )?,
        ),
        other => {
            return Err(format!(
                "the input must be a string or an array of token ids, not {}",
                kind(&other)
            ));
        }
    };
    if input.byte_len() > limits.max_input_bytes {
        return Err(format!(
            "input too long: at most {} bytes (4 per token id)",
            limits.max_input_bytes
        ));
    }
    let group = Group {
        model: model.unwrap_or_else(|| defaults.model.clone()),
        dimensions: dimensions.or(defaults.dimensions),
    };
    Ok((group, input))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Group {
        Group {
            model: "m".into(),
            dimensions: Some(8),
        }
    }

    fn parse(line: &str) -> Line {
        let limits = Limits {
            max_inputs: 1,
            max_input_bytes: 100,
            max_extra_fields: 0,
            max_model_bytes: 20,
        };
        parse_line(line.as_bytes(), &defaults(), &limits)
    }

    fn bad(line: &str) -> String {
        match parse(line) {
            Line::Bad(reason) => reason,
            other => panic!("{line}: expected bad, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_line_shapes() {
        assert_eq!(
            parse("\"hello\"\n"),
            Line::Input(defaults(), Input::Text("hello".into()))
        );
        assert_eq!(
            parse("[1, 2]"),
            Line::Input(defaults(), Input::Tokens(vec![1, 2]))
        );
        assert_eq!(
            parse(r#"{"input": "x"}"#),
            Line::Input(defaults(), Input::Text("x".into()))
        );
        assert_eq!(
            parse(r#"{"input": [7], "model": "other", "dimensions": 3}"#),
            Line::Input(
                Group {
                    model: "other".into(),
                    dimensions: Some(3)
                },
                Input::Tokens(vec![7])
            )
        );
        assert_eq!(
            parse(r#"{"input": "x", "model": null, "dimensions": null}"#),
            Line::Input(defaults(), Input::Text("x".into()))
        );
        assert_eq!(parse("   \r\n"), Line::Blank);
        assert_eq!(parse(""), Line::Blank);
    }

    #[test]
    fn names_what_is_wrong_with_a_line() {
        assert!(bad("{not json").starts_with("not JSON"));
        assert_eq!(bad("\"\""), "empty input");
        assert_eq!(bad(r#"{"input": []}"#), "empty input");
        assert!(bad(r#"{"model": "m"}"#).contains("no \"input\""));
        assert!(bad(r#"{"input": "x", "model": ""}"#).contains("model"));
        assert!(bad(r#"{"input": "x", "model": 3}"#).contains("model"));
        let long_model = format!(r#"{{"input": "x", "model": "{}"}}"#, "m".repeat(21));
        assert!(bad(&long_model).contains("model name is too long"));
        assert!(bad(r#"{"input": "x", "dimensions": 0}"#).contains("dimensions"));
        assert!(bad(r#"{"input": "x", "dimensions": "8"}"#).contains("dimensions"));
        assert!(bad(r#"{"input": "x", "input_type": "query"}"#).contains("input_type"));
        assert!(bad(r#"["a", "b"]"#).contains("token ids"));
        assert!(bad("[-1]").contains("token ids"));
        assert!(bad("[4294967296]").contains("token ids"));
        assert!(bad("[1.5]").contains("token ids"));
        assert!(bad("42").contains("a number"));
        assert!(bad(r#"{"input": {"a": 1}}"#).contains("an object"));
        assert!(bad(&format!("\"{}\"", "a".repeat(101))).contains("too long"));
    }

    #[test]
    fn scan_counts_lines_and_places_the_offset() {
        let dir = std::env::temp_dir().join(format!("embgate-scan-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("f");
        std::fs::write(&path, b"a\nbb\nccc").expect("write");
        let s = scan(&path, 5).expect("scan");
        assert_eq!((s.len, s.lines, s.newlines_before), (8, 3, 2));
        assert_eq!(s.byte_before, Some(b'\n'));
        let s = scan(&path, 0).expect("scan");
        assert_eq!((s.newlines_before, s.byte_before), (0, None));
        let s = scan(&path, 8).expect("scan");
        assert_eq!((s.newlines_before, s.byte_before), (2, Some(b'c')));
        std::fs::write(&path, b"").expect("write");
        assert_eq!(scan(&path, 0).expect("scan").lines, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
