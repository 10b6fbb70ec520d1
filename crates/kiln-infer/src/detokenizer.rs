//! Streaming text out of generated token ids without re-decoding the whole
//! continuation for every token.
//!
//! A token of a byte-level BPE can end in the middle of a UTF-8 character, and some
//! tokenizers only decode a word boundary correctly with the token before it. The
//! detokenizer decodes a short window — the tokens since the last emitted text plus a few
//! before them as context — and emits the new text once it no longer ends in an
//! incomplete character (`U+FFFD`). Each step decodes a bounded window, so the cost per
//! token does not grow with the length of the continuation.

use kiln_data::{DataError, Tokenizer};

/// Context tokens kept before the unread ones (enough for word-boundary merges).
const CONTEXT_TOKENS: usize = 4;

/// Incremental decoding of one sequence of generated tokens.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    tokens: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// Tokens before this index have been emitted.
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `token`; returns the text it completes (possibly empty, when it ends inside
    /// a character that later tokens finish).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, DataError> {
        self.tokens.push(token);
        let before = tokenizer.decode(&self.tokens[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.tokens[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let text = now[before.len()..].to_string();
            self.read = self.tokens.len();
            self.prefix = self.read.saturating_sub(CONTEXT_TOKENS);
            Ok(text)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back at the end of generation (an incomplete character is
    /// emitted as `U+FFFD`, as a full decode would).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, DataError> {
        let before = tokenizer.decode(&self.tokens[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.tokens[self.prefix..])?;
        self.read = self.tokens.len();
        Ok(if now.len() > before.len() && now.is_char_boundary(before.len()) {
            now[before.len()..].to_string()
        } else {
            String::new()
        })
    }
}

/// Stop strings over streamed text: finds the first occurrence of any of them and holds
/// back text that could still become one, so streamed text never shows part of a stop
/// string.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received and not yet released.
    pending: String,
}

/// What [`StopStrings::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Text safe to release (no stop string in it or starting in it).
    Continue(String),
    /// A stop string was hit: the text before it, and which stop string.
    Stopped { text: String, stop: String },
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Add newly decoded `text`.
    pub fn push(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        // The earliest stop string in the pending text.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = hit {
            let stop = stop.clone();
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stopped { text, stop };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let release = self.pending.len() - hold;
        let out = self.pending[..release].to_string();
        self.pending.drain(..release);
        StopScan::Continue(out)
    }

    /// Add the last decoded `text` of a sequence and release everything: the text
    /// before a stop string if one is hit, else all that was held back.
    pub fn push_final(&mut self, text: &str) -> String {
        match self.push(text) {
            StopScan::Continue(t) => t + &self.finish(),
            StopScan::Stopped { text, .. } => text,
        }
    }

    /// The held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, at a char
/// boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match s.push(p) {
                StopScan::Continue(t) => out += &t,
                StopScan::Stopped { text, stop } => {
                    out += &text;
                    return (out, Some(stop));
                }
            }
        }
        out += &s.finish();
        (out, None)
    }

    #[test]
    fn a_stop_string_split_over_tokens_is_found_and_never_shown() {
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("Hello"), StopScan::Continue("Hello".into()));
        assert_eq!(s.push(" world\n"), StopScan::Continue(" world".into()));
        assert_eq!(
            s.push("\nmore"),
            StopScan::Stopped {
                text: String::new(),
                stop: "\n\n".into()
            }
        );
        assert_eq!(
            scan_all(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), Some("END".into()))
        );
        assert_eq!(scan_all(&["END"], &["abc E", "N", "x"]), ("abc ENx".into(), None));
        assert_eq!(
            scan_all(&["xyz", "b"], &["aab", "xyz"]),
            ("aa".into(), Some("b".into()))
        );
        assert_eq!(scan_all(&[], &["a", "b"]), ("ab".into(), None));
    }

    /// A byte-level BPE trained on text with 2-, 3- and 4-byte characters: its tokens
    /// split characters, and the streamed pieces still add up to the full decode.
    #[test]
    fn streams_multi_byte_utf8_of_a_byte_level_bpe_exactly() {
        use kiln_data::TokenizerSpec;
        let text = "Café au lait, naïve façade. 日本語のテキスト。 Ünïcödé 🎉🚀 emoji! ".repeat(20);
        let tok = Tokenizer::build(&TokenizerSpec::Bpe(300), &text).unwrap();
        let sample = "naïve 日本語 🎉 façade Ünïcödé 🚀!";
        let ids = tok.encode(sample).unwrap();
        // Some token must end inside a character for the test to mean anything.
        let splits = (1..ids.len())
            .filter(|&i| tok.decode(&ids[..i]).unwrap().ends_with('\u{FFFD}'))
            .count();
        assert!(splits > 0, "no token ends inside a character");
        let mut d = Detokenizer::new();
        let mut streamed = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = d.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "token {i}: {piece:?}");
            streamed += &piece;
            // Never ahead of the full decode, never more than a few bytes behind.
            let full = tok.decode(&ids[..=i]).unwrap();
            assert!(full.starts_with(&streamed), "{streamed:?} vs {full:?}");
        }
        streamed += &d.finish(&tok).unwrap();
        assert_eq!(streamed, tok.decode(&ids).unwrap());
        assert_eq!(streamed, sample);
    }

    #[test]
    fn held_back_text_respects_char_boundaries() {
        assert_eq!(longest_suffix_prefix("é", "\u{e9}x"), 2);
        assert_eq!(scan_all(&["éx"], &["aé", "b"]), ("aéb".into(), None));
    }
}
