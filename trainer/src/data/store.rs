//! The decoded-image store: every image is decoded and resized once per process into a compact
//! uint8 file (memory-mapped, in the temporary directory, removed when the process ends) and
//! read from there by every later epoch, restoration round and evaluation that asks for the same
//! image at the same size. Decoding a JPEG costs more than a training step's share of a small
//! network at 64-128 px (bench/results/train-throughput.md), and the pipeline reads each image
//! tens of times.
//!
//! `MEDMERGE_DECODE_CACHE_BYTES` bounds the store (default 4 GiB; 0 turns it off). Images beyond
//! the bound, or any failure to create the file, fall back to decoding every time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use image::RgbImage;
use memmap2::MmapRaw;

use super::DataError;

/// Images per memory-mapped segment file.
const SEGMENT_IMAGES: usize = 256;
const DEFAULT_MAX_BYTES: u64 = 4 << 30;

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

/// `path` decoded and resized to `side`x`side` RGB: from the store when an earlier call put it
/// there, else decoded with `decode` (and stored, while the store has room).
pub fn resized(path: &Path, side: u32, decode: impl FnOnce() -> Result<RgbImage, DataError>) -> Result<RgbImage, DataError> {
    match store(side) {
        Some(store) => store.get_or_decode(path, decode),
        None => decode(),
    }
}

/// The process's store for images of `side` pixels, unless storing is off or unavailable.
fn store(side: u32) -> Option<Arc<ImageStore>> {
    static STORES: OnceLock<Mutex<HashMap<u32, Arc<ImageStore>>>> = OnceLock::new();
    let max_bytes = max_bytes();
    if max_bytes == 0 {
        return None;
    }
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    Some(stores.entry(side).or_insert_with(|| Arc::new(ImageStore::new(side, max_bytes))).clone())
}

fn max_bytes() -> u64 {
    static MAX: OnceLock<u64> = OnceLock::new();
    *MAX.get_or_init(|| parse_max_bytes(std::env::var("MEDMERGE_DECODE_CACHE_BYTES").ok().as_deref()))
}

fn parse_max_bytes(value: Option<&str>) -> u64 {
    match value.map(str::trim) {
        None | Some("") => DEFAULT_MAX_BYTES,
        Some(v) => v.parse().unwrap_or_else(|_| {
            tracing::warn!(value = v, "MEDMERGE_DECODE_CACHE_BYTES is not a whole number of bytes: using the default (4 GiB)");
            DEFAULT_MAX_BYTES
        }),
    }
}

/// Decoded images of one size, in segment files that are mapped as they fill up.
struct ImageStore {
    side: u32,
    /// Segments the bound allows.
    max_segments: usize,
    inner: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    by_path: HashMap<PathBuf, usize>,
    segments: Vec<Arc<Segment>>,
    /// Set when a segment file could not be made: decode every time from then on.
    unavailable: bool,
}

/// `SEGMENT_IMAGES` images in one unlinked temporary file, each with its fill state.
struct Segment {
    map: MmapRaw,
    states: Vec<AtomicU8>,
    image_bytes: usize,
}

impl ImageStore {
    fn new(side: u32, max_bytes: u64) -> Self {
        let segment_bytes = (side as u64 * side as u64 * 3 * SEGMENT_IMAGES as u64).max(1);
        ImageStore { side, max_segments: (max_bytes / segment_bytes) as usize, inner: Mutex::new(Slots::default()) }
    }

    fn get_or_decode(&self, path: &Path, decode: impl FnOnce() -> Result<RgbImage, DataError>) -> Result<RgbImage, DataError> {
        let Some((segment, slot)) = self.slot(path) else { return decode() };
        let bytes = segment.image_bytes;
        let at = slot * bytes;
        let state = &segment.states[slot];
        if state.load(Ordering::Acquire) == READY {
            // SAFETY: a READY slot is never written again, and `at + bytes` lies inside the map.
            let stored = unsafe { std::slice::from_raw_parts(segment.map.as_ptr().add(at), bytes) };
            return Ok(RgbImage::from_raw(self.side, self.side, stored.to_vec()).expect("side*side*3 bytes"));
        }
        let img = decode()?;
        debug_assert_eq!(img.dimensions(), (self.side, self.side));
        // Whoever moves the slot from EMPTY to WRITING writes it; a concurrent reader of the same
        // image decodes its own copy meanwhile.
        if img.as_raw().len() == bytes && state.compare_exchange(EMPTY, WRITING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // SAFETY: this thread alone holds the slot in WRITING; the range lies inside the map.
            unsafe { std::ptr::copy_nonoverlapping(img.as_raw().as_ptr(), segment.map.as_mut_ptr().add(at), bytes) };
            state.store(READY, Ordering::Release);
        }
        Ok(img)
    }

    /// The segment and slot of `path`, assigned on first sight; `None` when the store is full
    /// or its files cannot be made.
    fn slot(&self, path: &Path) -> Option<(Arc<Segment>, usize)> {
        let mut slots = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&i) = slots.by_path.get(path) {
            return Some((slots.segments[i / SEGMENT_IMAGES].clone(), i % SEGMENT_IMAGES));
        }
        if slots.unavailable {
            return None;
        }
        let i = slots.by_path.len();
        if i / SEGMENT_IMAGES == slots.segments.len() {
            if slots.segments.len() >= self.max_segments {
                return None;
            }
            match Segment::new(self.side) {
                Ok(s) => slots.segments.push(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %std::env::temp_dir().display(), "cannot create the decoded-image store: decoding every image each time it is read");
                    slots.unavailable = true;
                    return None;
                }
            }
        }
        slots.by_path.insert(path.to_path_buf(), i);
        Some((slots.segments[i / SEGMENT_IMAGES].clone(), i % SEGMENT_IMAGES))
    }
}

impl Segment {
    fn new(side: u32) -> std::io::Result<Self> {
        let image_bytes = side as usize * side as usize * 3;
        // An unlinked file: the kernel frees it when the map and handle go, even after a crash.
        let file = tempfile_in(&std::env::temp_dir())?;
        file.set_len((image_bytes * SEGMENT_IMAGES) as u64)?;
        let map = MmapRaw::map_raw(&file)?;
        Ok(Segment { map, states: (0..SEGMENT_IMAGES).map(|_| AtomicU8::new(EMPTY)).collect(), image_bytes })
    }
}

/// A new file in `dir` that is already unlinked.
fn tempfile_in(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dir.join(format!(".medmerge-decoded-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&name)?;
    std::fs::remove_file(&name)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(side: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(side, side, image::Rgb([v, v / 2, 7]))
    }

    #[test]
    fn an_image_is_decoded_once_and_then_read_from_the_store() {
        let store = ImageStore::new(4, 1 << 20);
        let decodes = std::cell::Cell::new(0);
        let decode = |v| {
            decodes.set(decodes.get() + 1);
            Ok(image(4, v))
        };
        assert_eq!(store.get_or_decode(Path::new("a.jpg"), || decode(10)).unwrap(), image(4, 10));
        assert_eq!(store.get_or_decode(Path::new("b.jpg"), || decode(20)).unwrap(), image(4, 20));
        assert_eq!(store.get_or_decode(Path::new("a.jpg"), || decode(99)).unwrap(), image(4, 10), "the stored pixels, not a new decode");
        assert_eq!(decodes.get(), 2);
    }

    #[test]
    fn a_full_store_decodes_every_time_and_a_failed_decode_stores_nothing() {
        // Room for one segment only.
        let store = ImageStore::new(2, (2 * 2 * 3 * SEGMENT_IMAGES) as u64);
        for i in 0..SEGMENT_IMAGES + 3 {
            store.get_or_decode(&PathBuf::from(format!("{i}.png")), || Ok(image(2, i as u8))).unwrap();
        }
        let past_the_end = PathBuf::from(format!("{}.png", SEGMENT_IMAGES + 1));
        assert_eq!(store.get_or_decode(&past_the_end, || Ok(image(2, 1))).unwrap(), image(2, 1), "decoded again: nowhere to keep it");
        let err = store.get_or_decode(Path::new("0-broken.png"), || Err(DataError::Empty { path: "0-broken.png".into() }));
        assert!(err.is_err());
        assert!(store.get_or_decode(Path::new("0.png"), || -> Result<RgbImage, DataError> { unreachable!("stored") }).is_ok());
    }

    #[test]
    fn the_bound_is_read_from_the_environment_value() {
        assert_eq!(parse_max_bytes(None), DEFAULT_MAX_BYTES);
        assert_eq!(parse_max_bytes(Some("0")), 0);
        assert_eq!(parse_max_bytes(Some(" 1024 ")), 1024);
        assert_eq!(parse_max_bytes(Some("lots")), DEFAULT_MAX_BYTES);
    }
}
