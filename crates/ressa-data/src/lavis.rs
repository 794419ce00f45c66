//! Readers for the LAVIS annotation formats (see the reference notes, §10). Errors name the
//! file and, for malformed JSON, the line and column.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{DataError, Result};

/// One `{"image": <relative path>, "caption": str}` item (CC3M prefix / instruct lists, COCO
/// Karpathy train), the format of calibration and RESSA training data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CaptionItem {
    pub image: String,
    pub caption: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a caption list; an empty list is an error (nothing to calibrate or train on).
pub fn read_caption_list(path: &Path) -> Result<Vec<CaptionItem>> {
    let items: Vec<CaptionItem> = read_json(path)?;
    if items.is_empty() {
        return Err(DataError::Field {
            path: path.to_path_buf(),
            field: "[]".into(),
            message: "the annotation list is empty".into(),
        });
    }
    Ok(items)
}

/// `root/relative`, refusing absolute or parent-escaping paths in annotations.
pub fn image_path(root: &Path, relative: &str, annotations: &Path) -> Result<PathBuf> {
    let rel = Path::new(relative);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(DataError::Field {
            path: annotations.to_path_buf(),
            field: "image".into(),
            message: format!("`{relative}` must be a path relative to the image directory"),
        });
    }
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_lists_parse_and_errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, r#"[{"image": "a/1.png", "caption": "a red circle"}]"#).unwrap();
        assert_eq!(read_caption_list(&ok).unwrap()[0].caption, "a red circle");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[\n {\"image\": \"x.png\"}\n]").unwrap();
        let err = read_caption_list(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("caption") && err.contains("line 2"), "{err}");
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, "[]").unwrap();
        assert!(read_caption_list(&empty).unwrap_err().to_string().contains("empty"));
        assert!(image_path(dir.path(), "../etc/passwd", &ok).is_err());
    }
}
