//! Rows of a data file as a stream of JSON objects, whatever the file type: `.jsonl`,
//! `.jsonl.gz`, `.json` (an array, or `{"data": [...]}`), `.parquet`. Each row carries where it
//! came from (`file:line`, or `file:row N`), and a bad row is an `Err` for that row only.
//!
//! ```no_run
//! for row in dpo::data::reader::rows(std::path::Path::new("train.jsonl")).unwrap() {
//!     let row = row.unwrap();
//!     println!("{}: {}", row.at, row.value);
//! }
//! ```
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// A row and its position, e.g. `train.jsonl:12`.
pub struct Row {
    pub at: String,
    pub value: serde_json::Value,
}

/// A row that could not be read: where, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadRow {
    pub at: String,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.reason)
    }
}

pub type RowResult = std::result::Result<Row, BadRow>;

/// The file types dpo reads, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Jsonl,
    JsonlGz,
    Json,
    Parquet,
}

impl FileType {
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        Ok(if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
            Self::JsonlGz
        } else if name.ends_with(".jsonl") {
            Self::Jsonl
        } else if name.ends_with(".json") {
            Self::Json
        } else if name.ends_with(".parquet") {
            Self::Parquet
        } else {
            bail!("{}: unsupported file type: dpo reads .jsonl, .jsonl.gz, .json and .parquet", path.display())
        })
    }
}

/// Every row of `path`, streamed (a `.json` file is parsed whole: it is one JSON value).
pub fn rows(path: &Path) -> Result<Box<dyn Iterator<Item = RowResult>>> {
    let name = path.display().to_string();
    let open = || std::fs::File::open(path).with_context(|| format!("opening dataset file {name}"));
    Ok(match FileType::of(path)? {
        FileType::Jsonl => Box::new(lines(BufReader::new(open()?), name)),
        FileType::JsonlGz => Box::new(lines(BufReader::new(flate2::read::MultiGzDecoder::new(open()?)), name)),
        FileType::Json => Box::new(json_array(open()?, &name)?),
        FileType::Parquet => Box::new(parquet_rows(open()?, &name)?),
    })
}

/// One row per non-blank line; yields `(byte offset of the line, row)`, offsets of the decoded text.
pub fn lines_with_offsets<R: BufRead>(mut reader: R, name: String) -> impl Iterator<Item = (u64, RowResult)> {
    let (mut offset, mut line_no) = (0u64, 0usize);
    let mut buf = Vec::new();
    std::iter::from_fn(move || {
        loop {
            buf.clear();
            let start = offset;
            line_no += 1;
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(n) => offset += n as u64,
                Err(e) => {
                    return Some((
                        start,
                        Err(BadRow { at: format!("{name}:{line_no}"), reason: format!("cannot read: {e}") }),
                    ));
                }
            }
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Some((start, parse_line(&buf, format!("{name}:{line_no}"))));
        }
    })
}

fn lines<R: BufRead>(reader: R, name: String) -> impl Iterator<Item = RowResult> {
    lines_with_offsets(reader, name).map(|(_, r)| r)
}

/// A JSON line to a row (errors name the position).
pub fn parse_line(bytes: &[u8], at: String) -> RowResult {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Err(BadRow {
                at,
                reason: format!("not UTF-8 text (invalid byte at column {})", e.valid_up_to() + 1),
            });
        }
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => Ok(Row { at, value }),
        Err(e) => Err(BadRow { at, reason: format!("malformed JSON ({e})") }),
    }
}

fn json_array(mut file: std::fs::File, name: &str) -> Result<impl Iterator<Item = RowResult> + use<>> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| anyhow!("{name}: not UTF-8 text (invalid byte at offset {})", e.valid_up_to()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!("{name}:{}: malformed JSON ({e})", e.line()))?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(mut o) if o.get("data").is_some_and(|d| d.is_array()) => match o.remove("data") {
            Some(serde_json::Value::Array(items)) => items,
            _ => unreachable!(),
        },
        _ => bail!("{name}: expected a JSON array of rows, or an object with a \"data\" array"),
    };
    let name = name.to_string();
    Ok(items.into_iter().enumerate().map(move |(i, value)| Ok(Row { at: format!("{name}: row {}", i + 1), value })))
}

fn parquet_rows(file: std::fs::File, name: &str) -> Result<impl Iterator<Item = RowResult> + use<>> {
    use parquet::file::reader::SerializedFileReader;
    let reader = SerializedFileReader::new(file).map_err(|e| anyhow!("{name}: not a readable parquet file ({e})"))?;
    let iter = reader.into_iter();
    let name = name.to_string();
    Ok(iter.enumerate().map(move |(i, row)| {
        let at = format!("{name}: row {}", i + 1);
        match row {
            Ok(r) => Ok(Row { at, value: r.to_json_value() }),
            Err(e) => Err(BadRow { at, reason: format!("cannot decode parquet row ({e})") }),
        }
    }))
}

/// The column names of a parquet file (to check that every file of a split has the same schema).
pub fn parquet_columns(path: &Path) -> Result<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: not a readable parquet file ({e})", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    Ok(schema.get_fields().iter().map(|f| f.name().to_string()).collect())
}
