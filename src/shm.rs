//! [`SharedMemory`]: a block of bytes shared between processes
//! (`multiprocessing.shared_memory.SharedMemory`).

use std::fmt;
use std::io;
use std::os::fd::AsFd;

use crate::error::Result;
use crate::sys::{file_len, memfd, set_len, shm_open, shm_unlink, SharedMapping};

/// The longest name `shm_open` takes (NAME_MAX, without the leading '/').
const MAX_NAME: usize = 255;

/// A block of shared memory: anonymous (inherited through `fork`), or a
/// named POSIX shared memory object that unrelated processes can open
/// (`multiprocessing.shared_memory.SharedMemory`).
///
/// Reads and writes are bounds-checked byte copies
/// ([`read_at`](SharedMemory::read_at), [`write_at`](SharedMemory::write_at));
/// they are not synchronized: pair them with a [`Lock`](crate::Lock), a
/// [`Semaphore`](crate::Semaphore) or an [`Event`](crate::Event) when
/// several processes write. [`as_slice`](SharedMemory::as_slice) and
/// [`as_mut_slice`](SharedMemory::as_mut_slice) give direct (unsafe) views.
///
/// The mapping stays valid in this process until the value is dropped, even
/// after [`unlink`](SharedMemory::unlink) removed the name.
///
/// ```
/// use multiproc::{Process, SharedMemory};
///
/// let shm = SharedMemory::new(4096)?;
/// let mut child = Process::new({
///     let shm = shm.clone();
///     move || shm.write_at(0, b"hello").unwrap()
/// });
/// child.start()?;
/// assert_eq!(child.join()?, 0);
/// let mut buf = [0u8; 5];
/// shm.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct SharedMemory {
    pub(crate) map: std::sync::Arc<SharedMapping>,
    name: Option<String>,
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("len", &self.len())
            .finish()
    }
}

fn invalid(msg: &'static str) -> crate::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg).into()
}

/// `"psm_x"` or `"/psm_x"` → `"psm_x"`, checked.
fn trim_name(name: &str) -> Result<&str> {
    let n = name.strip_prefix('/').unwrap_or(name);
    if n.is_empty() {
        return Err(invalid("shared memory name is empty"));
    }
    if n.len() > MAX_NAME {
        return Err(invalid("shared memory name is too long"));
    }
    if n.contains('/') || n.contains('\0') || n == "." || n == ".." {
        return Err(invalid(
            "shared memory name must not contain '/' or a nul byte",
        ));
    }
    Ok(n)
}

impl SharedMemory {
    /// `size` zeroed bytes of anonymous shared memory (a memfd): children
    /// forked afterwards share them; no other process can open them.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) for a `size` of 0; of
    /// another kind when the memory cannot be created or mapped.
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(100)?;
    /// assert_eq!(shm.len(), 100);
    /// assert_eq!(shm.name(), None);
    /// assert!(multiproc::SharedMemory::new(0).is_err());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(size: usize) -> Result<SharedMemory> {
        if size == 0 {
            return Err(invalid("shared memory size must be positive"));
        }
        let fd = memfd("multiproc-shm", size)?;
        let map = SharedMapping::from_fd(fd.as_fd(), size)?;
        Ok(SharedMemory {
            map: std::sync::Arc::new(map),
            name: None,
        })
    }

    /// Creates the POSIX shared memory object `name` (as Python's
    /// `SharedMemory(name, create=True, size=size)`: `"psm_job42"`; a leading
    /// '/' is trimmed) with `size` zeroed bytes, and maps it. It lives until
    /// [`unlink`](SharedMemory::unlink)ed (or the machine restarts), even
    /// after every process closed it.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`AlreadyExists`](io::ErrorKind::AlreadyExists) when the name is
    /// taken; [`InvalidInput`](io::ErrorKind::InvalidInput) for a size of 0
    /// or a name that is empty, too long or contains '/'; another kind when
    /// the object cannot be created or mapped.
    ///
    /// ```
    /// use multiproc::SharedMemory;
    ///
    /// let name = format!("psm_doc_create_{}", std::process::id());
    /// let shm = SharedMemory::create(&name, 64)?;
    /// assert_eq!(shm.name(), Some(name.as_str()));
    /// let err = SharedMemory::create(&name, 64).unwrap_err();
    /// assert_eq!(std::io::Error::from(err).kind(), std::io::ErrorKind::AlreadyExists);
    /// shm.unlink()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn create(name: &str, size: usize) -> Result<SharedMemory> {
        let name = trim_name(name)?;
        if size == 0 {
            return Err(invalid("shared memory size must be positive"));
        }
        let path = format!("/{name}");
        let fd = shm_open(&path, true)?;
        let mapped =
            set_len(fd.as_fd(), size).and_then(|()| SharedMapping::from_fd(fd.as_fd(), size));
        match mapped {
            Ok(map) => Ok(SharedMemory {
                map: std::sync::Arc::new(map),
                name: Some(name.to_owned()),
            }),
            Err(e) => {
                // Do not leave a half-made object behind under the name.
                let _ = shm_unlink(&path);
                Err(e.into())
            }
        }
    }

    /// Opens and maps the existing POSIX shared memory object `name`
    /// (Python's `SharedMemory(name)`), all of it.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`NotFound`](io::ErrorKind::NotFound) when no object has that name;
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) for a bad name or an
    /// object of size 0; another kind when it cannot be opened or mapped.
    ///
    /// ```
    /// use multiproc::SharedMemory;
    ///
    /// let name = format!("psm_doc_open_{}", std::process::id());
    /// let a = SharedMemory::create(&name, 16)?;
    /// a.write_at(0, b"hi")?;
    /// let b = SharedMemory::open(&format!("/{name}"))?; // a leading '/' is fine
    /// let mut buf = [0u8; 2];
    /// b.read_at(0, &mut buf)?;
    /// assert_eq!(&buf, b"hi");
    /// assert_eq!(b.len(), 16);
    /// a.unlink()?;
    /// let err = SharedMemory::open(&name).unwrap_err();
    /// assert_eq!(std::io::Error::from(err).kind(), std::io::ErrorKind::NotFound);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn open(name: &str) -> Result<SharedMemory> {
        let name = trim_name(name)?;
        let fd = shm_open(&format!("/{name}"), false)?;
        let size = file_len(fd.as_fd())?;
        if size == 0 {
            return Err(invalid("shared memory object is empty"));
        }
        let map = SharedMapping::from_fd(fd.as_fd(), size)?;
        Ok(SharedMemory {
            map: std::sync::Arc::new(map),
            name: Some(name.to_owned()),
        })
    }

    /// Removes the name (`shm_unlink`): later [`open`](SharedMemory::open)s
    /// fail, while every existing mapping (this one included) lives on until
    /// dropped. Call it once, from one process, when the memory is no longer
    /// to be found (Python's `unlink`).
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`NotFound`](io::ErrorKind::NotFound) when the name was already
    /// removed; [`InvalidInput`](io::ErrorKind::InvalidInput) for anonymous
    /// memory, which has no name.
    ///
    /// ```
    /// let name = format!("psm_doc_unlink_{}", std::process::id());
    /// let shm = multiproc::SharedMemory::create(&name, 8)?;
    /// shm.unlink()?;
    /// shm.write_at(0, &[1])?; // still mapped
    /// assert!(shm.unlink().is_err());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn unlink(&self) -> Result<()> {
        match &self.name {
            Some(n) => Ok(shm_unlink(&format!("/{n}"))?),
            None => Err(invalid("anonymous shared memory has no name to unlink")),
        }
    }

    /// The size in bytes.
    ///
    /// ```
    /// assert_eq!(multiproc::SharedMemory::new(10)?.len(), 10);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always `false`: shared memory has at least one byte. (For clippy's
    /// `len_without_is_empty`.)
    ///
    /// ```
    /// assert!(!multiproc::SharedMemory::new(1)?.is_empty());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The name without a leading '/', as given to
    /// [`create`](SharedMemory::create) or [`open`](SharedMemory::open);
    /// `None` for anonymous memory.
    ///
    /// ```
    /// let name = format!("/psm_doc_name_{}", std::process::id());
    /// let shm = multiproc::SharedMemory::create(&name, 8)?;
    /// assert_eq!(shm.name(), Some(&name[1..]));
    /// shm.unlink()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) when
    /// `offset + buf.len()` is past the end (or overflows).
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(4)?;
    /// let mut buf = [9u8; 4];
    /// shm.read_at(0, &mut buf)?;
    /// assert_eq!(buf, [0; 4]);
    /// assert!(shm.read_at(1, &mut buf).is_err());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        Ok(self.map.read_at(offset, buf)?)
    }

    /// Copies `data` to `offset`.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) when
    /// `offset + data.len()` is past the end (or overflows).
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(4)?;
    /// shm.write_at(2, &[1, 2])?;
    /// assert!(shm.write_at(3, &[1, 2]).is_err());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        Ok(self.map.write_at(offset, data)?)
    }

    /// The first byte of the memory, for FFI or your own synchronization
    /// (`len()` bytes, valid while `self` or a clone lives). Dereferencing
    /// it is `unsafe` and races with every process that maps the memory.
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(8)?;
    /// assert!(!shm.as_mut_ptr().is_null());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
}
