//! Decoders for what the block-error source reads: the tracepoint's `format` file, perf
//! ring-buffer records, and the raw `block:block_rq_error` entry inside a sample.
//!
//! Pure functions over bytes and text; no input panics.
//!
//! A perf ring record (`include/uapi/linux/perf_event.h`), as opened by this source with
//! `sample_type = PERF_SAMPLE_TIME | PERF_SAMPLE_CPU | PERF_SAMPLE_RAW`:
//!
//! ```text
//! u32 type; u16 misc; u16 size;          struct perf_event_header, size covers the record
//! PERF_RECORD_SAMPLE (9):  u64 time; u32 cpu; u32 res; u32 raw_size; u8 raw[raw_size]; pad to 8
//! PERF_RECORD_LOST (2):    u64 id; u64 lost;
//! ```
//!
//! The raw entry is the tracepoint's own record: the common fields (`u16 common_type` is
//! the event id) then the event's fields at the offsets its `format` file states. Offsets
//! change between kernels (6.12: `char rwbs[8]` at 32; 6.18: `u16 ioprio` at 32 and
//! `char rwbs[10]` at 34), so they are always read from `format`, never assumed.
//! `dev` is the kernel's internal `dev_t`: major in the upper 12 bits, minor in the lower 20.

use std::fmt;

pub const PERF_RECORD_LOST: u32 = 2;
pub const PERF_RECORD_SAMPLE: u32 = 9;
const HEADER_LEN: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A field the source needs is missing from the `format` file.
    MissingField(&'static str),
    /// A field has a size this decoder does not handle.
    FieldSize { field: &'static str, size: usize },
    /// A `format` line is not `field:TYPE NAME; offset:N; size:N; signed:N;`.
    BadFormatLine(String),
    /// Fewer bytes than the layout requires.
    Short { needed: usize, got: usize },
    /// A record header whose size is smaller than a header or not a multiple of 8.
    BadRecordSize(u16),
    /// The raw entry belongs to another event id.
    WrongEvent { expected: u16, got: u16 },
    /// The CPU list is not `N` / `N-M` separated by commas.
    BadCpuList(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::MissingField(name) => write!(f, "the format has no field '{name}'"),
            DecodeError::FieldSize { field, size } => {
                write!(f, "field '{field}' has unexpected size {size}")
            }
            DecodeError::BadFormatLine(line) => write!(f, "malformed format line '{line}'"),
            DecodeError::Short { needed, got } => {
                write!(f, "record too short: needed {needed} bytes, got {got}")
            }
            DecodeError::BadRecordSize(size) => write!(f, "bad perf record size {size}"),
            DecodeError::WrongEvent { expected, got } => {
                write!(f, "raw entry has event id {got}, expected {expected}")
            }
            DecodeError::BadCpuList(text) => write!(f, "malformed CPU list '{text}'"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Where one field lives in the raw entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The layout of `block:block_rq_error` on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    /// The tracepoint id (`ID:` in the format file; also the perf `config`).
    pub id: u16,
    pub common_type: Field,
    pub dev: Field,
    pub sector: Field,
    pub nr_sector: Field,
    pub error: Field,
    pub rwbs: Field,
}

impl Format {
    /// Parses the text of `events/block/block_rq_error/format`.
    pub fn parse(text: &str) -> Result<Format, DecodeError> {
        let mut id = None;
        let mut fields: Vec<(String, Field)> = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("ID:") {
                id = rest.trim().parse::<u16>().ok();
                if id.is_none() {
                    return Err(DecodeError::BadFormatLine(line.to_owned()));
                }
                continue;
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse::<usize>().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse::<usize>().ok();
                } else if part.starts_with("signed:") {
                } else if decl.is_none() {
                    decl = Some(part);
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                return Err(DecodeError::BadFormatLine(line.to_owned()));
            };
            // `char rwbs[10]` → `rwbs`; `__data_loc char[] cmd` → `cmd`.
            let name = decl
                .rsplit(' ')
                .next()
                .unwrap_or(decl)
                .split('[')
                .next()
                .unwrap_or_default()
                .to_owned();
            fields.push((name, Field { offset, size }));
        }
        let get = |name: &'static str, sizes: &[usize]| -> Result<Field, DecodeError> {
            let field = fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, f)| *f)
                .ok_or(DecodeError::MissingField(name))?;
            if sizes.contains(&field.size) {
                Ok(field)
            } else {
                Err(DecodeError::FieldSize {
                    field: name,
                    size: field.size,
                })
            }
        };
        Ok(Format {
            id: id.ok_or(DecodeError::MissingField("ID"))?,
            common_type: get("common_type", &[2])?,
            dev: get("dev", &[4])?,
            sector: get("sector", &[8])?,
            nr_sector: get("nr_sector", &[4])?,
            error: get("error", &[4])?,
            rwbs: get(
                "rwbs",
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            )?,
        })
    }

    /// Decodes one raw `block_rq_error` entry.
    pub fn decode(&self, raw: &[u8]) -> Result<RqError, DecodeError> {
        let common_type = u16::from_ne_bytes(bytes(raw, self.common_type)?);
        if common_type != self.id {
            return Err(DecodeError::WrongEvent {
                expected: self.id,
                got: common_type,
            });
        }
        let dev = u32::from_ne_bytes(bytes(raw, self.dev)?);
        let rwbs = slice(raw, self.rwbs)?;
        let rwbs_len = rwbs.iter().position(|b| *b == 0).unwrap_or(rwbs.len());
        Ok(RqError {
            major: dev >> 20,
            minor: dev & ((1 << 20) - 1),
            sector: u64::from_ne_bytes(bytes(raw, self.sector)?),
            sectors: u32::from_ne_bytes(bytes(raw, self.nr_sector)?),
            error: i32::from_ne_bytes(bytes(raw, self.error)?),
            rwbs: String::from_utf8_lossy(&rwbs[..rwbs_len]).into_owned(),
        })
    }
}

fn slice(raw: &[u8], field: Field) -> Result<&[u8], DecodeError> {
    let end = field.offset + field.size;
    raw.get(field.offset..end).ok_or(DecodeError::Short {
        needed: end,
        got: raw.len(),
    })
}

fn bytes<const N: usize>(raw: &[u8], field: Field) -> Result<[u8; N], DecodeError> {
    let s = slice(raw, Field { size: N, ..field })?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Ok(out)
}

/// One failed request, as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RqError {
    pub major: u32,
    pub minor: u32,
    /// First sector (512 bytes) of the request.
    pub sector: u64,
    /// Length of the request in sectors.
    pub sectors: u32,
    /// As the kernel reports it: a negative errno (`-5`).
    pub error: i32,
    /// The request's operation and flags (`R`, `WS`, `FF`, `D`, …).
    pub rwbs: String,
}

impl RqError {
    /// The errno as userspace writes it: positive.
    pub fn errno(&self) -> i32 {
        self.error.checked_abs().unwrap_or(i32::MAX)
    }

    /// The operation class used as the event subtype.
    pub fn operation_class(&self) -> &'static str {
        operation_class(&self.rwbs)
    }
}

/// The class of an `rwbs` string (`blk_fill_rwbs`): its first letter is the operation —
/// `F` (a flush with no data, `FN`/`FF`), `W`, `R`, `D` (discard), `E` (secure erase),
/// `Z` (zone operations), `N` (none).
pub fn operation_class(rwbs: &str) -> &'static str {
    match rwbs.as_bytes().first() {
        Some(b'R') => "read",
        Some(b'W') => "write",
        Some(b'D' | b'E') => "discard",
        Some(b'F') => {
            if rwbs.contains('W') {
                "write"
            } else if rwbs.contains('R') {
                "read"
            } else {
                "flush"
            }
        }
        _ => "other",
    }
}

/// One perf ring record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PerfRecord<'a> {
    Sample {
        time: u64,
        cpu: u32,
        raw: &'a [u8],
    },
    /// The kernel dropped `lost` samples because the ring was full.
    Lost {
        lost: u64,
    },
    /// Another record type (ignored).
    Other(u32),
}

/// Splits linear ring bytes into records. A trailing partial record is an error, since
/// the kernel only publishes whole records.
pub fn records(mut buf: &[u8]) -> impl Iterator<Item = Result<PerfRecord<'_>, DecodeError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let result = record(buf);
        match &result {
            Ok((_, len)) => buf = &buf[*len..],
            Err(_) => buf = &[],
        }
        Some(result.map(|(r, _)| r))
    })
}

/// Decodes the record at the start of `buf` and returns it with its length.
pub fn record(buf: &[u8]) -> Result<(PerfRecord<'_>, usize), DecodeError> {
    let short = |needed: usize| DecodeError::Short {
        needed,
        got: buf.len(),
    };
    let header = buf.get(..HEADER_LEN).ok_or_else(|| short(HEADER_LEN))?;
    let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
    let size = u16::from_ne_bytes([header[6], header[7]]);
    let len = usize::from(size);
    if len < HEADER_LEN || len % 8 != 0 {
        return Err(DecodeError::BadRecordSize(size));
    }
    let body = buf.get(HEADER_LEN..len).ok_or_else(|| short(len))?;
    let u64_at = |at: usize| -> Result<u64, DecodeError> {
        body.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_ne_bytes)
            .ok_or_else(|| short(HEADER_LEN + at + 8))
    };
    let u32_at = |at: usize| -> Result<u32, DecodeError> {
        body.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_ne_bytes)
            .ok_or_else(|| short(HEADER_LEN + at + 4))
    };
    let record = match kind {
        PERF_RECORD_SAMPLE => {
            let time = u64_at(0)?;
            let cpu = u32_at(8)?;
            let raw_size = usize::try_from(u32_at(16)?).unwrap_or(usize::MAX);
            let raw = body
                .get(20..20usize.saturating_add(raw_size))
                .ok_or_else(|| short(HEADER_LEN.saturating_add(20).saturating_add(raw_size)))?;
            PerfRecord::Sample { time, cpu, raw }
        }
        PERF_RECORD_LOST => PerfRecord::Lost { lost: u64_at(8)? },
        other => PerfRecord::Other(other),
    };
    Ok((record, len))
}

/// Parses `/sys/devices/system/cpu/online` (`0-3,6,8-9`).
pub fn cpu_list(text: &str) -> Result<Vec<u32>, DecodeError> {
    let bad = || DecodeError::BadCpuList(text.trim().to_owned());
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let first: u32 = first.parse().map_err(|_| bad())?;
        let last: u32 = last.parse().map_err(|_| bad())?;
        if last < first || last - first > 65_536 {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `events/block/block_rq_error/format` of the 6.18 host kernel.
    const FORMAT_6_18: &str = "name: block_rq_error
ID: 2106
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u %s,%u,%u [%d]\", REC->error
";

    /// The 6.12 guest kernel's format: no ioprio, `rwbs[8]`.
    const FORMAT_6_12: &str = "name: block_rq_error
ID: 1001
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:0;
";

    /// A raw entry as the 6.18 kernel wrote it for an O_DIRECT read of 8 sectors at
    /// sector 4096 of loop0 (7:0) failing with -EIO (a truncated backing file).
    fn raw_6_18() -> Vec<u8> {
        let mut raw = vec![0u8; 48];
        raw[0..2].copy_from_slice(&2106u16.to_ne_bytes());
        raw[4..8].copy_from_slice(&1234i32.to_ne_bytes());
        raw[8..12].copy_from_slice(&(7u32 << 20).to_ne_bytes());
        raw[16..24].copy_from_slice(&4096u64.to_ne_bytes());
        raw[24..28].copy_from_slice(&8u32.to_ne_bytes());
        raw[28..32].copy_from_slice(&(-5i32).to_ne_bytes());
        raw[34..35].copy_from_slice(b"R");
        raw[44..48].copy_from_slice(&((4u32 << 16) | 48).to_ne_bytes());
        raw
    }

    #[test]
    fn parses_both_kernel_layouts() {
        let new = Format::parse(FORMAT_6_18).unwrap();
        assert_eq!(new.id, 2106);
        assert_eq!(
            new.rwbs,
            Field {
                offset: 34,
                size: 10
            }
        );
        let old = Format::parse(FORMAT_6_12).unwrap();
        assert_eq!(old.id, 1001);
        assert_eq!(
            old.rwbs,
            Field {
                offset: 32,
                size: 8
            }
        );
        assert_eq!(
            old.error,
            Field {
                offset: 28,
                size: 4
            }
        );
    }

    #[test]
    fn decodes_a_raw_entry() {
        let format = Format::parse(FORMAT_6_18).unwrap();
        let e = format.decode(&raw_6_18()).unwrap();
        assert_eq!(
            e,
            RqError {
                major: 7,
                minor: 0,
                sector: 4096,
                sectors: 8,
                error: -5,
                rwbs: "R".into()
            }
        );
        assert_eq!(e.errno(), 5);
        assert_eq!(crate::sys::errno::errno_name(e.errno()), "EIO");
        assert_eq!(e.operation_class(), "read");
    }

    #[test]
    fn rejects_other_events_short_entries_and_missing_fields() {
        let format = Format::parse(FORMAT_6_18).unwrap();
        let mut raw = raw_6_18();
        raw[0..2].copy_from_slice(&7u16.to_ne_bytes());
        assert!(matches!(
            format.decode(&raw),
            Err(DecodeError::WrongEvent { got: 7, .. })
        ));
        let raw = raw_6_18();
        for len in 0..44 {
            assert!(format.decode(&raw[..len]).is_err(), "{len} bytes");
        }
        let no_error = FORMAT_6_18.replace("int error;", "int err;");
        assert_eq!(
            Format::parse(&no_error),
            Err(DecodeError::MissingField("error"))
        );
        assert!(Format::parse("ID: x\n").is_err());
        assert!(Format::parse("ID: 1\n\tfield:int a;\toffset:zz;\n").is_err());
    }

    fn sample(time: u64, cpu: u32, raw: &[u8]) -> Vec<u8> {
        let unpadded = 8 + 8 + 8 + 4 + raw.len();
        let size = unpadded.div_ceil(8) * 8;
        let mut rec = Vec::new();
        rec.extend_from_slice(&PERF_RECORD_SAMPLE.to_ne_bytes());
        rec.extend_from_slice(&0u16.to_ne_bytes());
        rec.extend_from_slice(&u16::try_from(size).unwrap().to_ne_bytes());
        rec.extend_from_slice(&time.to_ne_bytes());
        rec.extend_from_slice(&cpu.to_ne_bytes());
        rec.extend_from_slice(&0u32.to_ne_bytes());
        rec.extend_from_slice(&u32::try_from(raw.len()).unwrap().to_ne_bytes());
        rec.extend_from_slice(raw);
        rec.resize(size, 0);
        rec
    }

    #[test]
    fn splits_samples_and_lost_records() {
        let raw = raw_6_18();
        let mut ring = sample(42, 1, &raw);
        let mut lost = Vec::new();
        lost.extend_from_slice(&PERF_RECORD_LOST.to_ne_bytes());
        lost.extend_from_slice(&[0, 0, 24, 0]);
        lost.extend_from_slice(&9u64.to_ne_bytes());
        lost.extend_from_slice(&17u64.to_ne_bytes());
        ring.extend_from_slice(&lost);
        ring.extend_from_slice(&sample(43, 0, &raw));
        let got: Vec<_> = records(&ring).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                PerfRecord::Sample {
                    time: 42,
                    cpu: 1,
                    raw: &raw
                },
                PerfRecord::Lost { lost: 17 },
                PerfRecord::Sample {
                    time: 43,
                    cpu: 0,
                    raw: &raw
                },
            ]
        );
    }

    #[test]
    fn never_panics_on_truncated_or_garbage_rings() {
        let ring = sample(1, 0, &raw_6_18());
        for len in 0..ring.len() {
            let _ = records(&ring[..len]).count();
        }
        let mut garbage = ring.clone();
        garbage[6..8].copy_from_slice(&3u16.to_ne_bytes());
        assert!(records(&garbage).any(|r| r.is_err()));
        let mut huge = ring;
        huge[24..28].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(records(&huge).any(|r| r.is_err()));
        for seed in 0u8..=255 {
            let bytes: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = records(&bytes).count();
        }
    }

    #[test]
    fn cpu_lists_and_operation_classes() {
        assert_eq!(cpu_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(cpu_list("0,2-3,7").unwrap(), vec![0, 2, 3, 7]);
        assert!(cpu_list("").is_err());
        assert!(cpu_list("3-1").is_err());
        assert_eq!(operation_class("WS"), "write");
        assert_eq!(operation_class("FWFS"), "write");
        assert_eq!(operation_class("FF"), "flush");
        assert_eq!(operation_class("DS"), "discard");
        assert_eq!(operation_class("N"), "other");
    }
}
