//! A simulated disk for redb: writes land in a volatile image and only reach the durable image
//! on `sync_data`. A power cut keeps the durable image plus a random subset of the unsynced
//! sectors (a disk may have written some of them before the power went), which is what a real
//! crash can leave behind.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use rand::rngs::StdRng;
use redb::StorageBackend;

/// Unit in which unsynced writes survive or vanish at a power cut.
const SECTOR: u64 = 512;

#[derive(Default)]
struct DiskState {
    /// What the running process reads back.
    current: Vec<u8>,
    /// What survives a power cut for certain.
    durable: Vec<u8>,
    /// (offset, length) of writes since the last sync.
    pending: Vec<(u64, usize)>,
    /// After a power cut every I/O fails: the process is gone.
    dead: bool,
    /// I/O calls left before the power goes (`None`: no cut armed).
    fuse: Option<u64>,
    /// The broken variant: `sync_data` returns success without making anything durable.
    lie_fsync: bool,
}

/// One disk, shared by every backend handle opened on it.
#[derive(Clone)]
pub struct Disk(Arc<Mutex<DiskState>>);

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.lock();
        write!(
            f,
            "Disk(len {}, durable {}, pending {}, dead {})",
            d.current.len(),
            d.durable.len(),
            d.pending.len(),
            d.dead
        )
    }
}

impl Disk {
    /// An empty disk. `lie_fsync`: the broken variant whose fsync does nothing.
    pub fn new(lie_fsync: bool) -> Disk {
        Disk::from_image(Vec::new(), lie_fsync)
    }

    /// A disk holding `image`, all of it durable (what a machine finds after a reboot).
    pub fn from_image(image: Vec<u8>, lie_fsync: bool) -> Disk {
        Disk(Arc::new(Mutex::new(DiskState {
            current: image.clone(),
            durable: image,
            lie_fsync,
            ..DiskState::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn backend(&self) -> SimBackend {
        SimBackend(self.clone())
    }

    /// Cuts the power after `ops` more I/O calls (0: at the next one).
    pub fn arm(&self, ops: u64) {
        self.lock().fuse = Some(ops);
    }

    pub fn disarm(&self) {
        self.lock().fuse = None;
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        let mut d = self.lock();
        d.dead = true;
        d.fuse = None;
    }

    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// What the disk holds after the power came back: the durable bytes and, sector by sector,
    /// a random choice of the writes that were not synced. The file length is either the synced
    /// one or the latest one.
    pub fn crash_image(&self, rng: &mut StdRng) -> Vec<u8> {
        let d = self.lock();
        let len = if rng.random_bool(0.5) {
            d.durable.len()
        } else {
            d.current.len()
        };
        let mut img = d.durable.clone();
        img.resize(len, 0);
        for &(off, n) in &d.pending {
            let end = off + n as u64;
            let mut s = off - off % SECTOR;
            while s < end {
                if rng.random_bool(0.5) {
                    let a = s.max(off) as usize;
                    let b = ((s + SECTOR).min(end) as usize)
                        .min(len)
                        .min(d.current.len());
                    if a < b {
                        img[a..b].copy_from_slice(&d.current[a..b]);
                    }
                }
                s += SECTOR;
            }
        }
        img
    }
}

/// A redb storage backend on a simulated `Disk`.
#[derive(Debug)]
pub struct SimBackend(Disk);

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimBackend {
    /// Counts one I/O call against the fuse; fails once the power is gone.
    fn io(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let mut d = self.0.lock();
        if d.dead {
            return Err(power_lost());
        }
        match d.fuse {
            Some(0) => {
                d.dead = true;
                d.fuse = None;
                return Err(power_lost());
            }
            Some(n) => d.fuse = Some(n - 1),
            None => {}
        }
        Ok(d)
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.io()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let d = self.io()?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + out.len();
        if end > d.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the disk",
            ));
        }
        out.copy_from_slice(&d.current[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.io()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        d.current.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut d = self.io()?;
        if d.lie_fsync {
            return Ok(());
        }
        let DiskState {
            current,
            durable,
            pending,
            ..
        } = &mut *d;
        durable.resize(current.len(), 0);
        for &(off, n) in pending.iter() {
            let a = (off as usize).min(current.len());
            let b = (off as usize + n).min(current.len());
            durable[a..b].copy_from_slice(&current[a..b]);
        }
        pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.io()?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + data.len();
        if end > d.current.len() {
            d.current.resize(end, 0);
        }
        d.current[start..end].copy_from_slice(data);
        d.pending.push((offset, data.len()));
        Ok(())
    }
}
