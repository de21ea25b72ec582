//! A streamed ZIP archive of stored (uncompressed) entries: JPEGs do not compress, so each
//! entry is written as it is read, with its CRC-32 and sizes known up front (no data
//! descriptors), and the central directory is written at the end. Classic ZIP only: at most
//! [`ENTRIES_MAX`] entries and offsets below 4 GiB; the caller stops before either.

/// Entries one archive may hold (classic ZIP's 16-bit count).
pub const ENTRIES_MAX: usize = 65_535;
/// An archive is ended before its central directory would start at or beyond this offset.
pub const ARCHIVE_BYTES_MAX: u64 = u32::MAX as u64 - 1024 * 1024;

/// DOS date and time of an instant (Unix ms), as ZIP stores modification times.
fn dos_time(ms: i64) -> (u16, u16) {
    let (year, month, day, hour, minute, second) = crate::times::utc_parts(ms);
    if !(1980..=2107).contains(&year) {
        return (0, (1 << 5) | 1); // 1980-01-01 00:00
    }
    let [month, day, hour, minute, second] =
        [month, day, hour, minute, second].map(|part| part as u16);
    let time = (hour << 11) | (minute << 5) | (second / 2);
    let date = (((year - 1980) as u16) << 9) | (month << 5) | day;
    (time, date)
}

struct CentralEntry {
    name: String,
    crc: u32,
    size: u32,
    offset: u32,
    time: u16,
    date: u16,
}

/// Writes one archive in pieces: [`ZipStream::entry`] for each file, [`ZipStream::finish`]
/// once. Each call appends to `out` what can be sent at once.
#[derive(Default)]
pub struct ZipStream {
    offset: u64,
    entries: Vec<CentralEntry>,
}

impl ZipStream {
    /// True when one more entry of `size` bytes still fits the classic format.
    pub fn fits(&self, name: &str, size: usize) -> bool {
        let needed = 30 + name.len() as u64 + size as u64;
        self.entries.len() < ENTRIES_MAX && self.offset + needed < ARCHIVE_BYTES_MAX
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends one stored entry. The caller checked [`ZipStream::fits`].
    pub fn entry(&mut self, name: &str, modified_ms: i64, data: &[u8], out: &mut Vec<u8>) {
        debug_assert!(self.fits(name, data.len()));
        let crc = crc32fast::hash(data);
        let (time, date) = dos_time(modified_ms);
        let size = data.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        out.extend_from_slice(&0x0800u16.to_le_bytes()); // UTF-8 names
        out.extend_from_slice(&0u16.to_le_bytes()); // stored
        out.extend_from_slice(&time.to_le_bytes());
        out.extend_from_slice(&date.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // extra
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        self.entries.push(CentralEntry {
            name: name.to_string(),
            crc,
            size,
            offset: self.offset as u32,
            time,
            date,
        });
        self.offset += 30 + name.len() as u64 + data.len() as u64;
    }

    /// Appends the central directory and its end record.
    pub fn finish(self, out: &mut Vec<u8>) {
        let start = self.offset;
        let mut directory_bytes: u64 = 0;
        for entry in &self.entries {
            out.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes()); // made by
            out.extend_from_slice(&20u16.to_le_bytes()); // needed
            out.extend_from_slice(&0x0800u16.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&entry.time.to_le_bytes());
            out.extend_from_slice(&entry.date.to_le_bytes());
            out.extend_from_slice(&entry.crc.to_le_bytes());
            out.extend_from_slice(&entry.size.to_le_bytes());
            out.extend_from_slice(&entry.size.to_le_bytes());
            out.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
            out.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            out.extend_from_slice(&entry.offset.to_le_bytes());
            out.extend_from_slice(entry.name.as_bytes());
            directory_bytes += 46 + entry.name.len() as u64;
        }
        let count = self.entries.len() as u16;
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // disk numbers
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(directory_bytes as u32).to_le_bytes());
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_archive_opens_with_the_system_unzip_or_python() {
        let mut zip = ZipStream::default();
        let mut out = Vec::new();
        zip.entry(
            "E1_0001.jpg",
            1_718_100_000_000,
            b"\xff\xd8first\xff\xd9",
            &mut out,
        );
        zip.entry(
            "E1_0002.jpg",
            1_718_100_600_000,
            b"\xff\xd8second\xff\xd9",
            &mut out,
        );
        assert_eq!(zip.len(), 2);
        zip.finish(&mut out);
        // The end record says 2 entries and where the directory starts.
        let end = &out[out.len() - 22..];
        assert_eq!(&end[..4], &0x0605_4b50u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([end[10], end[11]]), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.zip");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&out)
            .unwrap();
        // Python's zipfile checks CRCs and offsets (the suite needs python3 anyway).
        let output = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; print(','.join(n+':'+str(len(z.read(n))) for n in z.namelist()))")
            .arg(&path)
            .output()
            .expect("python3 runs");
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "E1_0001.jpg:9,E1_0002.jpg:10"
        );
    }

    #[test]
    fn limits_are_checked() {
        let zip = ZipStream::default();
        assert!(zip.fits("a", 1000));
        assert!(!zip.fits("a", ARCHIVE_BYTES_MAX as usize));
        assert_eq!(dos_time(0), (0, 33));
    }
}
