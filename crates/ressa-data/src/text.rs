//! Tokenization through `tokenizers` (`tokenizer.json`, `qformer_tokenizer/tokenizer.json`).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// A tokenizer loaded from an HF `tokenizer.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

/// A padded batch: ids and 1/0 attention mask, both [B, L] row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

impl Batch {
    /// The same rows padded on the left (what a decoder-only model generates from): each row's
    /// tokens are moved to its end, padding and mask zeros first.
    pub fn left_padded(mut self) -> Batch {
        for (ids, mask) in self.ids.iter_mut().zip(&mut self.mask) {
            let pad = mask.iter().filter(|&&m| m == 0).count();
            ids.rotate_right(pad);
            mask.rotate_right(pad);
        }
        self
    }
}

/// A `TemplateProcessing` post-processor must define every special token its templates use
/// (the tokenizers crate panics on the first encode otherwise).
fn check_template_tokens(path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(());
    };
    let mut processors = vec![&v["post_processor"]];
    if let Some(list) = v["post_processor"]["processors"].as_array() {
        processors.extend(list);
    }
    for pp in processors {
        if pp["type"] != "TemplateProcessing" {
            continue;
        }
        for template in ["single", "pair"] {
            for piece in pp[template].as_array().into_iter().flatten() {
                if let Some(id) = piece["SpecialToken"]["id"].as_str()
                    && pp["special_tokens"].get(id).is_none()
                {
                    return Err(DataError::Field {
                        path: path.to_path_buf(),
                        field: format!("post_processor.{template}"),
                        message: format!(
                            "uses the special token `{id}`, which post_processor.special_tokens does not define"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "No such file or directory",
                ),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string().replace('\n', " "),
        })?;
        check_template_tokens(path)?;
        let t = Self {
            inner,
            path: path.to_path_buf(),
        };
        // A probe at open: a file that cannot encode fails here, naming itself.
        t.encode("a")?;
        Ok(t)
    }

    /// Token ids with the tokenizer's special tokens (e.g. `</s>`, `[CLS] … [SEP]`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // The tokenizers crate panics on some inconsistent files (a post-processor naming a
        // special token it has no id for): that is this file's error, not a crash.
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, true)
        }))
        .map_err(|_| DataError::Tokenizer {
            path: self.path.clone(),
            message: "the tokenizer failed on its own configuration (post_processor or special tokens inconsistent)".into(),
        })?
        .map_err(|e| DataError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes and right-pads with `pad` to the longest text.
    pub fn encode_batch(&self, texts: &[&str], pad: u32) -> Result<Batch> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_>>()?;
        let len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mask = ids
            .iter()
            .map(|r| (0..len).map(|i| u32::from(i < r.len())).collect())
            .collect();
        let ids = ids
            .into_iter()
            .map(|mut r| {
                r.resize(len, pad);
                r
            })
            .collect();
        Ok(Batch { ids, mask })
    }

    /// Truncates encodings to `max_length` ids (special tokens included), dropping tokens from
    /// the left (`left = true`, LAVIS' Q-Former tokenizer: `truncation_side="left"`) or the
    /// right (the `transformers` default), as `truncation=True, max_length=...` does.
    pub fn with_truncation(mut self, max_length: usize, left: bool) -> Result<Self> {
        let params = tokenizers::TruncationParams {
            direction: if left {
                tokenizers::TruncationDirection::Left
            } else {
                tokenizers::TruncationDirection::Right
            },
            max_length,
            strategy: tokenizers::TruncationStrategy::LongestFirst,
            stride: 0,
        };
        use tokenizers::PostProcessor as _;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= added {
            return Err(DataError::Tokenizer {
                path: self.path.clone(),
                message: format!(
                    "truncation length {max_length} leaves no room next to {added} special tokens"
                ),
            });
        }
        self.inner
            .with_truncation(Some(params))
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string().replace('\n', " "),
            })?;
        Ok(self)
    }

    /// The padding id the tokenizer declares (`padding.pad_id`), else the id of its `<pad>` or
    /// `[PAD]` token.
    pub fn pad_id(&self) -> Option<u32> {
        if let Some(p) = self.inner.get_padding() {
            return Some(p.pad_id);
        }
        ["<pad>", "[PAD]"]
            .iter()
            .find_map(|t| self.inner.token_to_id(t))
    }

    /// Ids the tokenizer can produce: its vocabulary with the added tokens.
    /// One past the largest id the tokenizer can produce (added tokens included): what a
    /// model's vocabulary must cover.
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The file the tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Batch;

    #[test]
    fn left_padding_moves_the_tokens_to_the_end() {
        let right = Batch {
            ids: vec![vec![1, 5, 6, 7], vec![1, 8, 0, 0]],
            mask: vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]],
        };
        let left = right.clone().left_padded();
        assert_eq!(left.ids, vec![vec![1, 5, 6, 7], vec![0, 0, 1, 8]]);
        assert_eq!(left.mask, vec![vec![1, 1, 1, 1], vec![0, 0, 1, 1]]);
    }
}
