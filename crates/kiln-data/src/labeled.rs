//! Labelled texts for sequence classification: train / validation / test CSV files,
//! a text column and a label column, tokenized once and batched with padding to the
//! longest text of each batch.
//!
//! The label set is the sorted set of labels of the training file (minus
//! `drop_labels`); a validation or test row with a label outside it is an error that
//! names the file, the line and the label. Decoding is strict UTF-8 unless
//! `encoding = "lenient"`, which drops undecodable bytes and unescapes HTML entities,
//! and counts what it repaired in a [`LoadReport`].

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{DataError, Tokenizer};

/// How undecodable bytes in a CSV are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Invalid UTF-8 is an error naming the file and line.
    #[default]
    Strict,
    /// Invalid byte sequences are dropped and HTML entities (`&amp;`, `&#39;`, ...)
    /// unescaped; every repaired row is counted.
    Lenient,
}

/// What to do with a row whose text is empty (or only whitespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyText {
    #[default]
    Error,
    /// Skip the row and count it.
    Drop,
}

/// What to do with a text longer than the model's maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first tokens (and the closing special token), count and warn.
    #[default]
    Warn,
    /// Refuse the data, naming the row.
    Error,
}

/// How a labelled-text dataset is read (the `[data] kind = "csv"` fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsvSpec {
    pub train: PathBuf,
    pub validation: PathBuf,
    pub test: PathBuf,
    pub text_column: String,
    pub label_column: String,
    pub drop_labels: Vec<String>,
    pub encoding: Encoding,
    pub empty_text: EmptyText,
}

/// One labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: usize,
    /// 1-based line of the record in its file (for error messages).
    pub line: u64,
}

/// What loading repaired or skipped, per file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Rows read (after the header).
    pub rows: usize,
    /// Rows whose label is in `drop_labels`.
    pub dropped_label: usize,
    /// Rows skipped for an empty text (`empty_text = "drop"`).
    pub dropped_empty: usize,
    /// Rows whose text held invalid UTF-8 that was removed.
    pub repaired_bytes: usize,
    /// Rows whose text held HTML entities that were unescaped.
    pub repaired_entities: usize,
}

/// Train / validation / test examples and the label names.
#[derive(Debug, Clone)]
pub struct LabeledTexts {
    pub labels: Vec<String>,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
    pub reports: Vec<(PathBuf, LoadReport)>,
}

/// A raw row: text and label, decoded.
struct Row {
    text: String,
    label: String,
    line: u64,
}

impl LabeledTexts {
    /// Read the three files. Labels come from the training file.
    pub fn load(spec: &CsvSpec) -> Result<Self, DataError> {
        let mut reports = Vec::new();
        let mut read = |path: &Path| -> Result<Vec<Row>, DataError> {
            let (rows, report) = read_rows(path, spec)?;
            reports.push((path.to_path_buf(), report));
            Ok(rows)
        };
        let train = read(&spec.train)?;
        let validation = read(&spec.validation)?;
        let test = read(&spec.test)?;
        let mut labels: Vec<String> = train.iter().map(|r| r.label.clone()).collect();
        labels.sort();
        labels.dedup();
        if labels.len() < 2 {
            return Err(DataError::format(
                &spec.train,
                format!(
                    "column {:?} has {} distinct label(s) {labels:?}; a classifier needs at least 2",
                    spec.label_column,
                    labels.len()
                ),
            ));
        }
        let index = |path: &Path, rows: Vec<Row>| -> Result<Vec<Example>, DataError> {
            rows.into_iter()
                .map(|r| match labels.binary_search(&r.label) {
                    Ok(label) => Ok(Example {
                        text: r.text,
                        label,
                        line: r.line,
                    }),
                    Err(_) => Err(DataError::format(
                        path,
                        format!(
                            "line {}: label {:?} does not occur in the training file {} (labels: {labels:?})",
                            r.line,
                            r.label,
                            spec.train.display()
                        ),
                    )),
                })
                .collect()
        };
        let train = index(&spec.train, train)?;
        let validation = index(&spec.validation, validation)?;
        let test = index(&spec.test, test)?;
        Ok(Self {
            labels,
            train,
            validation,
            test,
            reports,
        })
    }
}

fn read_rows(path: &Path, spec: &CsvSpec) -> Result<(Vec<Row>, LoadReport), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(file);
    let header = reader
        .byte_headers()
        .map_err(|e| DataError::format(path, format!("reading the header: {e}")))?
        .clone();
    let column = |name: &str| {
        header.iter().position(|h| h == name.as_bytes()).ok_or_else(|| {
            let found: Vec<String> = header.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect();
            DataError::format(path, format!("no column {name:?} (columns: {found:?})"))
        })
    };
    let (text_col, label_col) = (column(&spec.text_column)?, column(&spec.label_column)?);
    let mut report = LoadReport::default();
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| DataError::format(path, e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        report.rows += 1;
        let field = |i: usize| record.get(i).unwrap_or_default();
        let label = std::str::from_utf8(field(label_col))
            .map_err(|_| DataError::format(path, format!("line {line}: the label is not valid UTF-8")))?
            .trim()
            .to_string();
        if spec.drop_labels.contains(&label) {
            report.dropped_label += 1;
            continue;
        }
        let raw = field(text_col);
        let text = match (std::str::from_utf8(raw), spec.encoding) {
            (Ok(t), Encoding::Strict) => t.to_string(),
            (Err(e), Encoding::Strict) => {
                return Err(DataError::format(
                    path,
                    format!(
                        "line {line}: column {:?} is not valid UTF-8 ({e}); set data.encoding = \"lenient\" to drop undecodable bytes",
                        spec.text_column
                    ),
                ));
            }
            (decoded, Encoding::Lenient) => {
                let text = match decoded {
                    Ok(t) => t.to_string(),
                    Err(_) => {
                        report.repaired_bytes += 1;
                        drop_invalid_utf8(raw)
                    }
                };
                match unescape_html(&text) {
                    Some(unescaped) => {
                        report.repaired_entities += 1;
                        unescaped
                    }
                    None => text,
                }
            }
        };
        let text = text.trim().to_string();
        if text.is_empty() {
            match spec.empty_text {
                EmptyText::Error => {
                    return Err(DataError::format(
                        path,
                        format!(
                            "line {line}: column {:?} is empty; set data.empty_text = \"drop\" to skip such rows",
                            spec.text_column
                        ),
                    ));
                }
                EmptyText::Drop => {
                    report.dropped_empty += 1;
                    continue;
                }
            }
        }
        rows.push(Row { text, label, line });
    }
    if rows.is_empty() {
        return Err(DataError::format(path, "no rows left to use"));
    }
    Ok((rows, report))
}

/// `bytes` as UTF-8 with every undecodable sequence removed.
fn drop_invalid_utf8(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(valid) => {
                out.push_str(valid);
                return out;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).expect("checked prefix"));
                let skip = e.error_len().unwrap_or(rest.len());
                bytes = &rest[skip..];
            }
        }
    }
}

/// `text` with HTML character references unescaped, or `None` if it has none.
fn unescape_html(text: &str) -> Option<String> {
    if !text.contains('&') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let entity = rest[1..].find(';').filter(|&end| end <= 8).map(|end| &rest[1..=end]);
        let decoded = entity.and_then(|e| match e {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" | "#39" => Some('\''),
            _ => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        });
        match (entity, decoded) {
            (Some(e), Some(c)) => {
                out.push(c);
                rest = &rest[e.len() + 2..];
                changed = true;
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// One split tokenized: ids (with the tokenizer's special tokens) and labels.
#[derive(Debug, Clone, Default)]
pub struct EncodedSplit {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<usize>,
}

/// A padded batch: ids and mask `[B, T]` (T = the longest text), labels `[B]`.
#[derive(Debug, Clone)]
pub struct ClassBatch {
    pub ids: Tensor<2, Int>,
    pub mask: Tensor<2, Int>,
    pub labels: Tensor<1, Int>,
}

impl EncodedSplit {
    /// Tokenize `examples` (read from `path`), at most `max_len` tokens each. Returns the
    /// split and how many texts were truncated.
    pub fn encode(
        examples: &[Example],
        path: &Path,
        tokenizer: &Tokenizer,
        max_len: usize,
        truncation: Truncation,
    ) -> Result<(Self, usize), DataError> {
        let tokenizer = tokenizer.unpadded();
        let mut split = Self::default();
        let mut truncated = 0;
        for ex in examples {
            let (ids, cut) = encode_for_classifier(&tokenizer, &ex.text, max_len)?;
            if cut {
                if truncation == Truncation::Error {
                    return Err(DataError::format(
                        path,
                        format!(
                            "line {}: the text is {} tokens, more than max_length = {max_len}; set truncation = \"warn\" to cut it",
                            ex.line,
                            tokenizer.encode_with_special(&ex.text)?.len()
                        ),
                    ));
                }
                truncated += 1;
            }
            split.ids.push(ids);
            split.labels.push(ex.label);
        }
        Ok((split, truncated))
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows `indices`, padded (id 0, mask 0) to the longest of them.
    pub fn batch(&self, indices: &[usize], device: &Device) -> ClassBatch {
        let rows: Vec<&[u32]> = indices.iter().map(|&i| self.ids[i].as_slice()).collect();
        let (ids, mask) = pad_batch(&rows, device);
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        ClassBatch {
            ids,
            mask,
            labels: Tensor::from_data(TensorData::new(labels, [indices.len()]), device),
        }
    }
}

/// A text as an encoder's input: its ids with the special tokens (`[CLS] ... [SEP]`) by
/// an unpadded tokenizer, cut to `max_len` keeping the closing special token; and
/// whether it was cut.
pub fn encode_for_classifier(tokenizer: &Tokenizer, text: &str, max_len: usize) -> Result<(Vec<u32>, bool), DataError> {
    let mut ids = tokenizer.encode_with_special(text)?;
    if ids.len() <= max_len {
        return Ok((ids, false));
    }
    let last = *ids.last().expect("non-empty");
    ids.truncate(max_len.max(1) - 1);
    ids.push(last);
    Ok((ids, true))
}

/// Rows of ids padded to the longest: ids and mask (1 = token, 0 = padding) `[B, T]`.
pub fn pad_batch(rows: &[&[u32]], device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let b = rows.len();
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![0i64; b * t];
    let mut mask = vec![0i64; b * t];
    for (row, r) in rows.iter().enumerate() {
        for (j, &id) in r.iter().enumerate() {
            ids[row * t + j] = id as i64;
            mask[row * t + j] = 1;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [b, t]), device),
        Tensor::from_data(TensorData::new(mask, [b, t]), device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_bytes_are_dropped_and_entities_unescaped() {
        assert_eq!(drop_invalid_utf8(b"cars_\x89\xdb_.no"), "cars__.no");
        assert_eq!(drop_invalid_utf8("héllo".as_bytes()), "héllo");
        assert_eq!(
            unescape_html("a &amp; b &#39;c&#x41; &nope; &").as_deref(),
            Some("a & b 'cA &nope; &")
        );
        assert_eq!(unescape_html("plain"), None);
        assert_eq!(unescape_html("AT&T"), None);
    }
}
