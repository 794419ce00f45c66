//! Per-patch labels of the shapes world's scenes (`annotations/scenes_{split}.json`), the
//! targets of the vision tower's pretraining: InstructBLIP's ViT comes pretrained and is frozen
//! while the Q-Former and the language model learn; a toy trained from scratch gets the same
//! split of work when its ViT first learns what each patch shows (issue #18).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{DataError, Result};
use crate::shapes::{CELLS, COLORS, SHAPES, SIZES};

/// Content classes of a patch: 0 empty, else 1 + (shape, colour, size).
pub const CONTENT_CLASSES: usize = 1 + SHAPES.len() * COLORS.len() * SIZES.len();
/// Position classes: the scene's 3×3 cells.
pub const CELL_CLASSES: usize = CELLS.len();

/// One image and, for each patch of a `grid`×`grid` tower (row-major), what its scene cell
/// holds and which cell it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchLabels {
    pub image: PathBuf,
    pub content: Vec<u32>,
    pub cell: Vec<u32>,
}

#[derive(Deserialize)]
struct SceneFile {
    image: String,
    shapes: Vec<SceneShape>,
}

#[derive(Deserialize)]
struct SceneShape {
    cell: String,
    color: String,
    shape: String,
    size: String,
}

fn index_of(list: &[&str], name: &str, field: &str, path: &Path, image: &str) -> Result<usize> {
    list.iter().position(|&n| n == name).ok_or_else(|| {
        DataError::Input(format!(
            "{}: image {image}: `{field}` is {name:?}, expected one of {list:?}",
            path.display()
        ))
    })
}

/// Reads `scenes` (as [`crate::shapes::generate`] writes it) into per-patch labels for a vision
/// tower with `grid`×`grid` patches; image paths are joined to `images`. A patch belongs to the
/// cell that holds it, so `grid` must be a multiple of 3.
pub fn read_patch_labels(scenes: &Path, images: &Path, grid: usize) -> Result<Vec<PatchLabels>> {
    if grid == 0 || !grid.is_multiple_of(3) {
        return Err(DataError::Input(format!(
            "{}: the vision tower has {grid}×{grid} patches, expected a multiple of 3 so that \
             every patch lies in one of the scene's 3×3 cells",
            scenes.display()
        )));
    }
    let text = std::fs::read_to_string(scenes)
        .map_err(|e| DataError::Input(format!("{}: {e}", scenes.display())))?;
    let files: Vec<SceneFile> = serde_json::from_str(&text)
        .map_err(|e| DataError::Input(format!("{}: {e}", scenes.display())))?;
    let per = grid / 3;
    let cell_of = |p: usize| (p / grid / per) * 3 + (p % grid) / per;
    files
        .iter()
        .map(|f| {
            let mut by_cell = [0u32; CELL_CLASSES];
            for s in &f.shapes {
                let cell = index_of(&CELLS, &s.cell, "cell", scenes, &f.image)?;
                let kind = index_of(&SHAPES, &s.shape, "shape", scenes, &f.image)?;
                let colors: Vec<&str> = COLORS.iter().map(|c| c.0).collect();
                let color = index_of(&colors, &s.color, "color", scenes, &f.image)?;
                let size = index_of(&SIZES, &s.size, "size", scenes, &f.image)?;
                if by_cell[cell] != 0 {
                    return Err(DataError::Input(format!(
                        "{}: image {}: two shapes in cell {:?}",
                        scenes.display(),
                        f.image,
                        s.cell
                    )));
                }
                by_cell[cell] = (1 + (kind * COLORS.len() + color) * SIZES.len() + size) as u32;
            }
            let cells: Vec<u32> = (0..grid * grid).map(|p| cell_of(p) as u32).collect();
            Ok(PatchLabels {
                image: images.join(&f.image),
                content: cells.iter().map(|&c| by_cell[c as usize]).collect(),
                cell: cells,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{ShapesConfig, generate};

    #[test]
    fn labels_follow_the_drawn_scene() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShapesConfig {
            train: 6,
            val: 0,
            test: 0,
            image_size: 48,
            ..Default::default()
        };
        generate(&cfg, dir.path()).unwrap();
        let scenes = dir.path().join("annotations/scenes_train.json");
        let images = dir.path().join("images");
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&scenes).unwrap()).unwrap();
        let labels = read_patch_labels(&scenes, &images, 3).unwrap();
        assert_eq!(labels.len(), 6);
        for (l, s) in labels.iter().zip(raw.as_array().unwrap()) {
            assert!(l.image.exists());
            assert_eq!(l.cell, (0..9).collect::<Vec<u32>>());
            let shapes = s["shapes"].as_array().unwrap();
            assert_eq!(l.content.iter().filter(|&&c| c != 0).count(), shapes.len());
            for sh in shapes {
                let cell = CELLS.iter().position(|&c| c == sh["cell"]).unwrap();
                let c = l.content[cell] as usize - 1;
                assert_eq!(SHAPES[c / (COLORS.len() * 2)], sh["shape"]);
                assert_eq!(COLORS[c / 2 % COLORS.len()].0, sh["color"]);
                assert_eq!(SIZES[c % 2], sh["size"]);
            }
        }
        // A 6×6 tower: each cell is 2×2 patches with that cell's label.
        let fine = read_patch_labels(&scenes, &images, 6).unwrap();
        for (f, l) in fine.iter().zip(&labels) {
            for p in 0..36 {
                let cell = (p / 6 / 2) * 3 + (p % 6) / 2;
                assert_eq!(f.cell[p], cell as u32);
                assert_eq!(f.content[p], l.content[cell]);
            }
        }
    }

    #[test]
    fn bad_scenes_and_grids_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scenes.json");
        let err = read_patch_labels(&path, dir.path(), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("4×4 patches") && err.contains("multiple of 3"),
            "{err}"
        );
        std::fs::write(
            &path,
            r#"[{"image":"a.png","shapes":[{"cell":"middle","color":"red","shape":"circle","size":"small"}]}]"#,
        )
        .unwrap();
        let err = read_patch_labels(&path, dir.path(), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`cell` is \"middle\"") && err.contains("a.png"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        std::fs::write(&path, "{").unwrap();
        let err = read_patch_labels(&path, dir.path(), 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scenes.json"), "{err}");
    }
}
