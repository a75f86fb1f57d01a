//! Labelled image sets: ImageFolder directories and CSV manifests, decoding and batching.

mod image;
mod loader;
mod store;

use std::path::{Path, PathBuf};

pub use self::image::{decode_image, decode_image_bytes, load_pixels, load_resized, normalise, Augment, MEAN, STD};
pub use loader::{Batch, BatchLoader};

/// Errors finding or reading images.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data location is missing or unreadable.
    #[error("cannot read data at {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No images were found.
    #[error("no images (.jpg, .jpeg, .png) found in {path}")]
    Empty { path: PathBuf },
    /// A class folder or manifest label is not one of the model's classes.
    #[error("{path}{}: class {class:?} is not one of the model's classes {known:?}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    UnknownClass { path: PathBuf, line: Option<usize>, class: String, known: Vec<String> },
    /// A JPEG file ends before its end-of-image marker (an interrupted copy or download).
    #[error("image {path} is truncated (no JPEG end-of-image marker): copy it again or remove it")]
    Truncated { path: PathBuf },
    /// A manifest row is malformed.
    #[error("{path}, line {line}: {message}")]
    Manifest { path: PathBuf, line: usize, message: String },
    /// An image cannot be decoded.
    #[error("cannot decode image {path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: ::image::ImageError,
    },
}

/// One labelled image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Image file.
    pub path: PathBuf,
    /// Class index (for multi-label data: the first positive label, or 0).
    pub label: usize,
    /// Multi-hot labels, one 0/1 entry per class (multi-label data only; empty otherwise).
    pub targets: Vec<u8>,
}

/// A labelled image set.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Where it was read from (for messages).
    pub source: PathBuf,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// The images.
    pub samples: Vec<Sample>,
    /// Whether samples carry multi-hot `targets` rather than one label.
    pub multi_label: bool,
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let err = |source| DataError::Read { path: dir.into(), source };
    let mut v = std::fs::read_dir(dir).map_err(err)?.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>().map_err(err)?;
    v.sort();
    Ok(v)
}

impl Dataset {
    /// Reads an ImageFolder directory or a `path,label` CSV manifest. With `classes` given, every
    /// class found must be one of them (label order is theirs); otherwise the classes are the
    /// sorted folder names (or sorted manifest labels).
    pub fn open(path: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        let ds = if path.is_dir() { Self::image_folder(path, classes)? } else { Self::manifest(path, classes)? };
        if ds.samples.is_empty() {
            return Err(DataError::Empty { path: path.into() });
        }
        Ok(ds)
    }

    /// Every image under `dir`, recursively and in path order, unlabelled (for prediction).
    /// Symbolic links are followed, but a directory already visited (a link cycle, or two links
    /// to one place) is read once.
    pub fn unlabelled(dir: &Path, classes: &[String]) -> Result<Self, DataError> {
        let mut visited = std::collections::HashSet::new();
        let mut pending = vec![dir.to_path_buf()];
        let mut samples = Vec::new();
        while let Some(d) = pending.pop() {
            let real = d.canonicalize().map_err(|source| DataError::Read { path: d.clone(), source })?;
            if !visited.insert(real) {
                tracing::warn!(dir = %d.display(), "already read (a symbolic link loop or a second link to it): skipped");
                continue;
            }
            for p in sorted_entries(&d)? {
                if p.is_dir() {
                    pending.push(p);
                } else if is_image(&p) {
                    samples.push(Sample { path: p, label: 0, targets: vec![] });
                }
            }
        }
        samples.sort_by(|a, b| a.path.cmp(&b.path));
        if samples.is_empty() {
            return Err(DataError::Empty { path: dir.into() });
        }
        Ok(Dataset { source: dir.into(), classes: classes.to_vec(), samples, multi_label: false })
    }

    fn image_folder(dir: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        let mut folders: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
        if classes.is_none() {
            // Folder names become classes: one without images (empty, or only other files)
            // would be a class with no examples, so it is skipped, and said.
            let mut with_images = Vec::new();
            for folder in folders {
                if sorted_entries(&folder)?.iter().any(|p| is_image(p)) {
                    with_images.push(folder);
                } else {
                    tracing::warn!(folder = %folder.display(), "skipped: no .jpg, .jpeg or .png images, so not a class");
                }
            }
            folders = with_images;
        }
        let names: Vec<String> = folders.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        let classes: Vec<String> = classes.map(<[String]>::to_vec).unwrap_or_else(|| names.clone());
        let mut samples = Vec::new();
        for (folder, name) in folders.iter().zip(&names) {
            let label = classes.iter().position(|c| c == name).ok_or_else(|| DataError::UnknownClass { path: folder.clone(), line: None, class: name.clone(), known: classes.clone() })?;
            samples.extend(sorted_entries(folder)?.into_iter().filter(|p| is_image(p)).map(|path| Sample { path, label, targets: vec![] }));
        }
        Ok(Dataset { source: dir.into(), classes, samples, multi_label: false })
    }

    fn manifest(file: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(file).map_err(|source| DataError::Read { path: file.into(), source })?;
        let records = crate::table::read_records(&text).map_err(|(line, message)| DataError::Manifest { path: file.into(), line, message })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        let header = records.first().map(|r| r.cells.as_slice()).unwrap_or_default();
        let has_header = header.first().is_some_and(|c| c.eq_ignore_ascii_case("path"));
        if has_header && header.len() > 2 {
            return Self::wide_manifest(file, &records, resolve, classes);
        }
        let mut rows = Vec::new();
        for record in records.iter().skip(usize::from(has_header)) {
            // An unquoted path may hold commas: the label is the last cell.
            let Some((label, path)) = record.cells.split_last().filter(|(_, path)| !path.is_empty()) else {
                return Err(DataError::Manifest { path: file.into(), line: record.line, message: format!("expected `path,label`, got {:?}", record.cells.join(",")) });
            };
            rows.push((resolve(&path.join(",")), label.clone(), record.line));
        }
        let classes: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => {
                let mut c: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
                c.sort();
                c.dedup();
                c
            }
        };
        let samples = rows
            .into_iter()
            .map(|(path, class, line)| match classes.iter().position(|c| *c == class) {
                Some(label) => Ok(Sample { path, label, targets: vec![] }),
                None => Err(DataError::UnknownClass { path: file.into(), line: Some(line), class, known: classes.clone() }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Dataset { source: file.into(), classes, samples, multi_label: false })
    }

    /// A multi-label manifest: `path,<class1>,<class2>,...` with one 0/1 column per class.
    fn wide_manifest(file: &Path, records: &[crate::table::CsvRecord], resolve: impl Fn(&str) -> PathBuf, classes: Option<&[String]>) -> Result<Self, DataError> {
        let columns = &records[0].cells[1..];
        let classes: Vec<String> = classes.map(<[String]>::to_vec).unwrap_or_else(|| columns.to_vec());
        let order = columns
            .iter()
            .map(|c| classes.iter().position(|k| k == c).ok_or_else(|| DataError::UnknownClass { path: file.into(), line: Some(1), class: c.to_string(), known: classes.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        let mut samples = Vec::new();
        for record in &records[1..] {
            let cells = &record.cells;
            let bad = |message: String| DataError::Manifest { path: file.into(), line: record.line, message };
            if cells.len() != columns.len() + 1 {
                return Err(bad(format!("expected {} columns, got {}", columns.len() + 1, cells.len())));
            }
            let mut targets = vec![0u8; classes.len()];
            for (cell, &k) in cells[1..].iter().zip(&order) {
                targets[k] = match cell.as_str() {
                    "0" => 0,
                    "1" => 1,
                    other => return Err(bad(format!("label values must be 0 or 1, got {other:?}"))),
                };
            }
            let label = targets.iter().position(|&t| t == 1).unwrap_or(0);
            samples.push(Sample { path: resolve(&cells[0]), label, targets });
        }
        Ok(Dataset { source: file.into(), classes, samples, multi_label: true })
    }

    /// Images per class (positives per label for multi-label data).
    pub fn class_counts(&self) -> Vec<u64> {
        let mut c = vec![0u64; self.classes.len()];
        for s in &self.samples {
            if self.multi_label {
                c.iter_mut().zip(&s.targets).for_each(|(n, &t)| *n += t as u64);
            } else {
                c[s.label] += 1;
            }
        }
        c
    }

    /// A subset with the same classes.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        Dataset { source: self.source.clone(), classes: self.classes.clone(), samples: indices.iter().map(|&i| self.samples[i].clone()).collect(), multi_label: self.multi_label }
    }

    /// Writes the set as a manifest with absolute paths (`path,label`, or the wide multi-label form).
    pub fn write_manifest(&self, path: &Path) -> std::io::Result<()> {
        let mut table =
            if self.multi_label { crate::table::CsvTable::new(std::iter::once("path").chain(self.classes.iter().map(String::as_str))) } else { crate::table::CsvTable::new(["path", "label"]) };
        for s in &self.samples {
            let p = std::fs::canonicalize(&s.path).unwrap_or_else(|_| s.path.clone()).display().to_string();
            if self.multi_label {
                table.row(std::iter::once(p).chain(s.targets.iter().map(u8::to_string)));
            } else {
                table.row([p, self.classes[s.label].clone()]);
            }
        }
        table.write_atomic(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn image_folders_become_sorted_classes() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("normal/1.png"));
        touch(&d.path().join("glaucoma/2.jpg"));
        touch(&d.path().join("glaucoma/notes.txt"));
        let ds = Dataset::open(d.path(), None).unwrap();
        assert_eq!(ds.classes, vec!["glaucoma", "normal"]);
        assert_eq!(ds.class_counts(), vec![1, 1]);
    }

    #[test]
    fn an_unknown_class_folder_is_named() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("tumour/1.png"));
        let e = Dataset::open(d.path(), Some(&["normal".to_string(), "glaucoma".to_string()])).unwrap_err().to_string();
        assert!(e.contains("tumour") && e.contains("not one of the model's classes"), "{e}");
    }

    #[test]
    fn an_empty_shard_is_refused_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("normal")).unwrap();
        let e = Dataset::open(d.path(), None).unwrap_err().to_string();
        assert!(e.contains("no images") && e.contains(&d.path().display().to_string()), "{e}");
    }

    #[test]
    fn manifests_resolve_paths_next_to_themselves() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m.csv");
        std::fs::write(&m, "path,label\nimgs/a.png,b\n/abs/c.png,a\n").unwrap();
        let ds = Dataset::open(&m, None).unwrap();
        assert_eq!(ds.classes, vec!["a", "b"]);
        assert_eq!(ds.samples[0], Sample { path: d.path().join("imgs/a.png"), label: 1, targets: vec![] });
        assert_eq!(ds.samples[1].path, PathBuf::from("/abs/c.png"));
    }

    #[test]
    fn wide_manifests_are_multi_label() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("rfmid.csv");
        std::fs::write(&m, "path,DR,ARMD,MH\na.png,1,0,1\nb.png,0,0,0\n").unwrap();
        let ds = Dataset::open(&m, None).unwrap();
        assert!(ds.multi_label);
        assert_eq!(ds.classes, vec!["DR", "ARMD", "MH"]);
        assert_eq!(ds.samples[0].targets, vec![1, 0, 1]);
        assert_eq!(ds.class_counts(), vec![1, 0, 1]);
        std::fs::write(&m, "path,DR,ARMD\na.png,1,2\n").unwrap();
        let e = Dataset::open(&m, None).unwrap_err().to_string();
        assert!(e.contains("rfmid.csv, line 2") && e.contains("0 or 1"), "{e}");
    }

    #[test]
    fn a_written_manifest_reads_back_with_commas_and_quotes_in_paths_and_classes() {
        let d = tempfile::tempdir().unwrap();
        let classes = vec!["drusen, early".to_string(), "say \"normal\"".to_string()];
        let samples = vec![Sample { path: d.path().join("a,b.png"), label: 0, targets: vec![] }, Sample { path: d.path().join("c \"q\".png"), label: 1, targets: vec![] }];
        let ds = Dataset { source: d.path().into(), classes: classes.clone(), samples: samples.clone(), multi_label: false };
        let m = d.path().join("m.csv");
        ds.write_manifest(&m).unwrap();
        let back = Dataset::open(&m, Some(&classes)).unwrap();
        assert_eq!(back.samples, samples);
        let wide = Dataset { multi_label: true, samples: samples.iter().map(|s| Sample { targets: vec![1, 1 - s.label as u8], label: 0, ..s.clone() }).collect(), ..ds };
        wide.write_manifest(&m).unwrap();
        let back = Dataset::open(&m, None).unwrap();
        assert_eq!((back.classes, back.samples), (classes, wide.samples));
    }

    #[test]
    fn a_malformed_manifest_line_is_named() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m.csv");
        std::fs::write(&m, "path,label\nno-comma-here\n").unwrap();
        let e = Dataset::open(&m, None).unwrap_err().to_string();
        assert!(e.contains("m.csv, line 2"), "{e}");
    }
}
