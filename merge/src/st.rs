//! safetensors files: memory-mapped reading one tensor at a time, and a streaming writer that
//! publishes atomically (temporary file, fsync, rename), so a reader never sees half a file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use safetensors::tensor::{Dtype, SafeTensors};

/// Errors reading or writing safetensors files.
#[derive(Debug, thiserror::Error)]
pub enum StError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The header is not valid safetensors.
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    /// A tensor that should be there is not.
    #[error("{path} has no tensor {name:?}")]
    Missing { path: PathBuf, name: String },
    /// A tensor has a dtype medmerge cannot use there.
    #[error("{path}: tensor {name:?} has dtype {dtype}, expected F32")]
    Dtype { path: PathBuf, name: String, dtype: String },
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The writer was fed something other than what its header promised.
    #[error("writing {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Name, dtype and shape of one stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// Tensor name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// safetensors dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn nbytes(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// A memory-mapped safetensors file. Tensors are read on demand, so opening is cheap and
/// memory use is the size of the tensors being worked on, not the file.
pub struct MappedFile {
    path: PathBuf,
    file: File,
    map: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, (TensorMeta, (usize, usize))>,
    metadata: BTreeMap<String, String>,
    /// Whether any page was borrowed from the mapping since the last [`MappedFile::release`]:
    /// a file read only by positioned reads has nothing to release.
    mapped_since_release: AtomicBool,
}

impl MappedFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self, StError> {
        let file = File::open(path).map_err(|source| StError::Open { path: path.into(), source })?;
        // SAFETY: artifacts are published by rename and never modified in place afterwards.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| StError::Open { path: path.into(), source })?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| StError::Format { path: path.into(), message: e.to_string() })?;
        let tensors = meta.tensors().into_iter().map(|(name, info)| (name.clone(), (TensorMeta { name, dtype: info.dtype, shape: info.shape.clone() }, info.data_offsets))).collect();
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(MappedFile { path: path.into(), file, map, data_start: 8 + header_len, tensors, metadata, mapped_since_release: AtomicBool::new(false) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor's description, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorMeta> {
        self.tensors.values().map(|(m, _)| m)
    }

    /// One tensor's description.
    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name).map(|(m, _)| m)
    }

    /// Raw little-endian bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Result<&[u8], StError> {
        let (_, (start, end)) = self.tensors.get(name).ok_or_else(|| StError::Missing { path: self.path.clone(), name: name.into() })?;
        self.mapped_since_release.store(true, Ordering::Relaxed);
        Ok(&self.map[self.data_start + start..self.data_start + end])
    }

    /// A tensor as f32 values (F32 only: medmerge stores every float tensor in F32), read from
    /// the file rather than the mapping.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, StError> {
        let meta = self.meta(name).ok_or_else(|| StError::Missing { path: self.path.clone(), name: name.into() })?;
        if meta.dtype != Dtype::F32 {
            return Err(StError::Dtype { path: self.path.clone(), name: name.into(), dtype: format!("{:?}", meta.dtype) });
        }
        let mut values = vec![0.0; meta.numel()];
        self.read_f32_into(name, 0, &mut values)?;
        Ok(values)
    }

    /// A tensor's f32 values borrowed from the mapping, copied only when misaligned: reading N
    /// vectors costs no memory beyond the page cache.
    pub fn f32_view(&self, name: &str) -> Result<Cow<'_, [f32]>, StError> {
        let meta = self.meta(name).ok_or_else(|| StError::Missing { path: self.path.clone(), name: name.into() })?;
        if meta.dtype != Dtype::F32 {
            return Err(StError::Dtype { path: self.path.clone(), name: name.into(), dtype: format!("{:?}", meta.dtype) });
        }
        let bytes = self.bytes(name)?;
        if cfg!(target_endian = "little") {
            // SAFETY: every bit pattern is a valid f32, and the file is little-endian like us.
            let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return Ok(Cow::Borrowed(values));
            }
        }
        Ok(Cow::Owned(bytes_to_f32(bytes)))
    }

    /// Copies F32 tensor `name`'s values `first..first + out.len()` into `out` with one
    /// positioned read of the file (not the mapping): no page faults and nothing to release.
    /// A read past the tensor's end, or of another dtype, is refused by name.
    pub fn read_f32_into(&self, name: &str, first: usize, out: &mut [f32]) -> Result<(), StError> {
        use std::os::unix::fs::FileExt;
        let (meta, (start, end)) = self.tensors.get(name).ok_or_else(|| StError::Missing { path: self.path.clone(), name: name.into() })?;
        if meta.dtype != Dtype::F32 || (first + out.len()) * 4 > end - start {
            return Err(StError::Dtype { path: self.path.clone(), name: name.into(), dtype: format!("{:?} {:?} (expected F32 of at least {} values)", meta.dtype, meta.shape, first + out.len()) });
        }
        // SAFETY: every bit pattern is a valid f32, and the bytes cover exactly `out`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(out)) };
        self.file.read_exact_at(bytes, (self.data_start + start + first * 4) as u64).map_err(|source| StError::Open { path: self.path.clone(), source })?;
        if cfg!(target_endian = "big") {
            out.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
        }
        Ok(())
    }

    /// Drops the file's pages from this process's resident set (they stay in the page cache and
    /// are read again if touched), so streaming through many large files keeps memory flat.
    /// The whole mapping, not one tensor's range: the kernel maps neighbouring pages on every
    /// fault, and releasing only the tensor read left those behind (240 MiB over 64 ResNet50
    /// vectors). Unmapped ranges cost next to nothing to walk. Taking `&mut self` guarantees no
    /// view into the mapping is alive.
    pub fn release(&mut self) {
        if !std::mem::take(self.mapped_since_release.get_mut()) {
            return;
        }
        // SAFETY: a read-only private file mapping: dropped pages are re-read from the file,
        // and `&mut self` means no borrowed slice of them exists.
        let _ = unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }

    /// A tensor as f64 values (F64 only; used for batch-norm moments).
    pub fn f64(&self, name: &str) -> Result<Vec<f64>, StError> {
        let meta = self.meta(name).ok_or_else(|| StError::Missing { path: self.path.clone(), name: name.into() })?;
        if meta.dtype != Dtype::F64 {
            return Err(StError::Dtype { path: self.path.clone(), name: name.into(), dtype: format!("{:?}", meta.dtype) });
        }
        Ok(self.bytes(name)?.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8"))).collect())
    }
}

/// How much a [`StreamWriter`] writes before asking the disk to start on it.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Little-endian bytes to f32 values.
pub fn bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("chunk of 4"))).collect()
}

/// f32 values to little-endian bytes.
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    f32_as_le_bytes(values).into_owned()
}

/// f32 values as little-endian bytes, borrowed without a copy on little-endian machines.
pub fn f32_as_le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: u8 has no alignment or validity requirements, and the length covers exactly
        // the values' bytes, which are little-endian on this machine.
        return Cow::Borrowed(unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) });
    }
    Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes a safetensors file tensor by tensor, in the order given up front, into a temporary
/// file next to `path`; [`StreamWriter::finish`] publishes it by rename. Dropping an unfinished
/// writer removes the temporary file, so a failed stage leaves nothing a later stage would read.
pub struct StreamWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    pending: std::collections::VecDeque<TensorMeta>,
    /// Bytes handed to the file so far, and how many of them the disk was asked to write.
    written: u64,
    writeback_started: u64,
}

impl StreamWriter {
    /// Starts a file holding `tensors` (written in this order) and `metadata`.
    pub fn create(path: &Path, tensors: Vec<TensorMeta>, metadata: &BTreeMap<String, String>) -> Result<Self, StError> {
        let werr = |source| StError::Write { path: path.into(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let tmp = temp_path(path);
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map serialises"));
        }
        let mut offset = 0usize;
        for t in &tensors {
            let n = t.nbytes();
            header.insert(t.name.clone(), serde_json::json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, offset + n]}));
            offset += n;
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json serialises");
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let file = File::create(&tmp).map_err(werr)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(werr)?;
        out.write_all(&header).map_err(werr)?;
        let written = 8 + header.len() as u64;
        Ok(StreamWriter { path: path.into(), tmp, out: Some(out), pending: tensors.into(), written, writeback_started: 0 })
    }

    /// Writes the next tensor's bytes; `name` must be the next one promised.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), StError> {
        let next = self.pending.pop_front().ok_or_else(|| StError::Protocol { path: self.path.clone(), message: format!("unexpected extra tensor {name:?}") })?;
        if next.name != name || next.nbytes() != bytes.len() {
            return Err(StError::Protocol { path: self.path.clone(), message: format!("expected {:?} ({} bytes), got {name:?} ({} bytes)", next.name, next.nbytes(), bytes.len()) });
        }
        let out = self.out.as_mut().expect("writer open until finish");
        out.write_all(bytes).map_err(|source| StError::Write { path: self.path.clone(), source })?;
        self.written += bytes.len() as u64;
        if self.written - self.writeback_started >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Asks the disk to start writing what the file holds so far, without waiting for it: the
    /// writes overlap the rest of the stream, and [`StreamWriter::finish`]'s sync waits only for
    /// the tail.
    fn start_writeback(&mut self) -> Result<(), StError> {
        let out = self.out.as_mut().expect("writer open until finish");
        out.flush().map_err(|source| StError::Write { path: self.path.clone(), source })?;
        let in_file = self.written;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open descriptor owned by `out`; it reads no memory.
            // Only a hint: the final fsync guarantees durability, so its result is ignored.
            let _ = unsafe { libc::sync_file_range(out.get_ref().as_raw_fd(), self.writeback_started as i64, (in_file - self.writeback_started) as i64, libc::SYNC_FILE_RANGE_WRITE) };
        }
        self.writeback_started = in_file;
        Ok(())
    }

    /// Flushes, syncs and atomically renames the file into place.
    pub fn finish(mut self) -> Result<(), StError> {
        if let Some(t) = self.pending.front() {
            return Err(StError::Protocol { path: self.path.clone(), message: format!("tensor {:?} was never written", t.name) });
        }
        let werr = |source| StError::Write { path: self.path.clone(), source };
        let out = self.out.take().expect("writer open until finish");
        let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        std::fs::rename(&self.tmp, &self.path).map_err(werr)
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A hidden sibling temporary path naming its process, that readers never look for and a
/// later stage sweeps if this process is killed ([`medmerge_store::scratch`]).
pub fn temp_path(path: &Path) -> PathBuf {
    medmerge_store::scratch::temp_name(path)
}

/// Writes `bytes` to `path` atomically (temporary file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn dtype_name(d: Dtype) -> String {
    // safetensors' serde names (F32, I64, ...) are the Debug names.
    format!("{d:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_file_reads_back_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let metas = vec![TensorMeta { name: "b".into(), dtype: Dtype::F32, shape: vec![2] }, TensorMeta { name: "a".into(), dtype: Dtype::F32, shape: vec![1, 3] }];
        let md = BTreeMap::from([("kind".to_string(), "model".to_string())]);
        let mut w = StreamWriter::create(&path, metas, &md).unwrap();
        w.write("b", &f32_to_bytes(&[1.0, 2.0])).unwrap();
        w.write("a", &f32_to_bytes(&[3.0, 4.0, 5.0])).unwrap();
        w.finish().unwrap();
        let f = MappedFile::open(&path).unwrap();
        assert_eq!(f.f32("a").unwrap(), vec![3.0, 4.0, 5.0]);
        assert_eq!(f.f32("b").unwrap(), vec![1.0, 2.0]);
        assert_eq!(f.metadata()["kind"], "model");
    }

    #[test]
    fn a_file_larger_than_the_writeback_step_reads_back_whole_and_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let n = (WRITEBACK_STEP as usize / 4) * 3 / 2 + 7; // each tensor crosses a writeback step
        let tensors: Vec<Vec<f32>> = (0..3).map(|k| (0..n).map(|i| (i % 977) as f32 + k as f32 * 0.5).collect()).collect();
        let metas: Vec<TensorMeta> = (0..3).map(|k| TensorMeta { name: format!("t{k}"), dtype: Dtype::F32, shape: vec![n] }).collect();
        let mut w = StreamWriter::create(&path, metas, &BTreeMap::new()).unwrap();
        for (k, t) in tensors.iter().enumerate() {
            w.write(&format!("t{k}"), &f32_to_bytes(t)).unwrap();
        }
        w.finish().unwrap();
        let f = MappedFile::open(&path).unwrap();
        for (k, t) in tensors.iter().enumerate() {
            assert!(f.f32(&format!("t{k}")).unwrap() == *t, "tensor t{k}");
        }
        let (first, len) = (n / 3 + 3, n / 2 + 11); // unaligned, across a writeback step
        let mut out = vec![0.0f32; len];
        f.read_f32_into("t2", first, &mut out).unwrap();
        assert!(out == tensors[2][first..first + len]);
        let e = f.read_f32_into("t2", n - 2, &mut [0.0; 3]).unwrap_err().to_string();
        assert!(e.contains("t2"), "a read past the tensor's end is refused by name: {e}");
    }

    #[test]
    fn only_a_file_read_through_its_mapping_has_pages_to_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut w = StreamWriter::create(&path, vec![TensorMeta { name: "a".into(), dtype: Dtype::F32, shape: vec![3] }], &BTreeMap::new()).unwrap();
        w.write("a", &f32_to_bytes(&[1.0, 2.0, 3.0])).unwrap();
        w.finish().unwrap();
        let mut f = MappedFile::open(&path).unwrap();
        assert_eq!(f.f32("a").unwrap(), vec![1.0, 2.0, 3.0]);
        assert!(!*f.mapped_since_release.get_mut(), "positioned reads map nothing");
        assert_eq!(f.f32_view("a").unwrap().as_ref(), &[1.0, 2.0, 3.0]);
        assert!(*f.mapped_since_release.get_mut(), "a view borrows the mapping");
        f.release();
        assert!(!*f.mapped_since_release.get_mut(), "released");
    }

    #[test]
    fn an_unfinished_writer_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut w = StreamWriter::create(&path, vec![TensorMeta { name: "a".into(), dtype: Dtype::F32, shape: vec![2] }], &BTreeMap::new()).unwrap();
        assert!(w.write("wrong", &f32_to_bytes(&[1.0, 2.0])).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_truncated_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{").unwrap();
        let e = MappedFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }
}
