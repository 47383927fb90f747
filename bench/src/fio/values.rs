//! Structured fio option values beyond plain numbers: per-direction lists (`rate=1m,500k`),
//! block-size splits (`bssplit=4k/60:64k/40`), engine names, verify kinds and `:`-separated
//! filename lists. Parsers return `InvalidValue` with an empty option name; the caller names it.

use super::error::OptionError;
use super::size::parse_size;

/// A value per I/O direction, as fio's `read,write[,trim]` lists give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadWrite<T> {
    pub read: T,
    pub write: T,
}

/// fio's per-direction list: `V` sets both directions, `R,W` each, an empty field leaves that
/// direction unset. A third (trim) field is accepted and dropped: we issue no trims, so a trim
/// limit can never bite. A value of 0 means "no limit", as in fio.
pub fn parse_per_direction(text: &str) -> Result<ReadWrite<Option<u64>>, OptionError> {
    let fields: Vec<&str> = text.split(',').map(str::trim).collect();
    if fields.len() > 3 {
        return Err(OptionError::bad_value(text, "expected at most read,write,trim values"));
    }
    let parse = |field: &str| -> Result<Option<u64>, OptionError> {
        match field {
            "" => Ok(None),
            _ => Ok(Some(parse_size(field).map_err(|_| OptionError::bad_value(text, "expected a number"))?)
                .filter(|&value| value > 0)),
        }
    };
    let read = parse(fields[0])?;
    let write = match fields.get(1) {
        Some(field) => parse(field)?,
        None => read,
    };
    if let Some(trim) = fields.get(2) {
        parse(trim)?;
    }
    Ok(ReadWrite { read, write })
}

/// One `bssplit` entry: a block size and the share of I/Os that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitEntry {
    pub block_size_bytes: u64,
    pub percent: u32,
}

/// The parsed `bssplit`: a weighted list of block sizes per direction. Shares add up to 100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BsSplit {
    pub per_direction: ReadWrite<Vec<SplitEntry>>,
}

impl BsSplit {
    /// The block size for a roll in `0..100`, for `writes` or reads.
    pub fn pick(&self, writes: bool, roll: u32) -> u64 {
        assert!(roll < 100, "a roll is a percentage");
        let entries = if writes { &self.per_direction.write } else { &self.per_direction.read };
        let mut below = 0;
        for entry in entries {
            below += entry.percent;
            if roll < below {
                return entry.block_size_bytes;
            }
        }
        entries.last().expect("a split has at least one entry").block_size_bytes
    }

    /// The largest block size used in any direction (what a lane's buffer must hold).
    pub fn max_bytes(&self) -> u64 {
        self.entries().map(|entry| entry.block_size_bytes).max().unwrap_or(0)
    }

    /// The smallest block size used in any direction (the alignment of random offsets).
    pub fn min_bytes(&self) -> u64 {
        self.entries().map(|entry| entry.block_size_bytes).min().unwrap_or(0)
    }

    fn entries(&self) -> impl Iterator<Item = &SplitEntry> {
        self.per_direction.read.iter().chain(&self.per_direction.write)
    }
}

/// `bssplit=SIZE/PCT:SIZE/PCT...[,WRITE-LIST[,TRIM-LIST]]`. Entries without a share split what
/// the others leave of 100 evenly (fio's rule); the last one takes the rounding rest.
pub fn parse_bssplit(text: &str) -> Result<BsSplit, OptionError> {
    let lists: Vec<&str> = text.split(',').collect();
    if lists.len() > 3 {
        return Err(OptionError::bad_value(text, "expected at most read,write,trim lists"));
    }
    let read = parse_split_list(lists[0], text)?;
    let write = match lists.get(1).filter(|list| !list.trim().is_empty()) {
        Some(list) => parse_split_list(list, text)?,
        None => read.clone(),
    };
    if let Some(trim) = lists.get(2).filter(|list| !list.trim().is_empty()) {
        parse_split_list(trim, text)?; // checked, unused: we issue no trims
    }
    Ok(BsSplit { per_direction: ReadWrite { read, write } })
}

fn parse_split_list(list: &str, whole: &str) -> Result<Vec<SplitEntry>, OptionError> {
    let bad = |reason: &str| OptionError::bad_value(whole, reason);
    let mut entries = Vec::new();
    let mut unshared = Vec::new();
    for item in list.split(':').map(str::trim) {
        let (size, percent) = match item.split_once('/') {
            Some((_, rest)) if rest.contains('/') => return Err(bad("per-entry priorities are cmdprio_bssplit's")),
            Some((size, percent)) => {
                let percent = percent.trim().parse::<u32>().ok().filter(|&pct| pct <= 100);
                (size, Some(percent.ok_or_else(|| bad("a percentage is 0 to 100"))?))
            }
            None => (item, None),
        };
        let block_size_bytes = parse_size(size).map_err(|_| bad("bad block size"))?;
        if block_size_bytes == 0 {
            return Err(bad("a block size must be greater than 0"));
        }
        if percent.is_none() {
            unshared.push(entries.len());
        }
        entries.push(SplitEntry { block_size_bytes, percent: percent.unwrap_or(0) });
    }
    let shared: u32 = entries.iter().map(|entry| entry.percent).sum();
    if shared > 100 {
        return Err(bad("the percentages add up to more than 100"));
    }
    if let Some(each) = (100 - shared).checked_div(unshared.len() as u32) {
        unshared.iter().for_each(|&index| entries[index].percent = each);
    }
    let total: u32 = entries.iter().map(|entry| entry.percent).sum();
    if total == 0 {
        return Err(bad("no block size has a share"));
    }
    entries.last_mut().expect("split yields at least one item").percent += 100 - total;
    Ok(entries)
}

/// `bsrange=MIN-MAX`: only a single size (MIN = MAX) is supported; a real range is refused
/// rather than run with some other distribution than fio's.
pub fn parse_bsrange(text: &str) -> Result<u64, OptionError> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high) = (parse_size(low.trim())?, parse_size(high.trim())?);
    if low != high {
        return Err(OptionError::bad_value(text, "only a single size (MIN equal to MAX) is supported; use bssplit"));
    }
    Ok(low)
}

/// fio engine names we run, and how. Every file engine runs on our io_uring reactor (or its
/// thread fallback); the synchronous ones keep one I/O in flight, as fio's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring, libaio, posixaio: asynchronous, `iodepth` I/Os in flight.
    Async,
    /// sync, psync, vsync, pvsync, pvsync2: one I/O at a time whatever `iodepth` says.
    Sync,
    /// null: no device; completes at once.
    Null,
    /// rbd: a Ceph image (`pool`/`rbdname`/`clientname` or `filename=rbd:...`).
    Rbd,
    /// nbd: an NBD export (`uri=`, as fio's libnbd engine, or an NBD URI as `filename=`).
    Nbd,
}

/// Maps fio's `ioengine=` name to ours; anything else is refused with the name in the error.
pub fn parse_engine(text: &str) -> Result<Engine, OptionError> {
    match text {
        "io_uring" | "libaio" | "posixaio" => Ok(Engine::Async),
        "sync" | "psync" | "vsync" | "pvsync" | "pvsync2" => Ok(Engine::Sync),
        "null" => Ok(Engine::Null),
        "rbd" => Ok(Engine::Rbd),
        "nbd" => Ok(Engine::Nbd),
        _ => Err(OptionError::bad_value(
            text,
            "unsupported engine (supported: io_uring, libaio, posixaio, sync, psync, vsync, pvsync, pvsync2, null, rbd, nbd)",
        )),
    }
}

/// fio's `exit_what`: which jobs a finishing `exitall` job stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExitWhat {
    /// The rest of its reporting group (fio's default).
    #[default]
    Group,
    /// Every job of its stonewall phase.
    Stonewall,
    /// Every job, and no later phase starts.
    All,
}

pub fn parse_exit_what(text: &str) -> Result<ExitWhat, OptionError> {
    match text {
        "group" => Ok(ExitWhat::Group),
        "stonewall" => Ok(ExitWhat::Stonewall),
        "all" => Ok(ExitWhat::All),
        _ => Err(OptionError::bad_value(text, "expected group, stonewall or all")),
    }
}

/// `verify=` checksums we write into each block's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyKind {
    Crc32c,
    Md5,
}

/// `verify=`: crc32c (also fio's `crc32c-intel` spelling) or md5; 0/none turns it off.
pub fn parse_verify(text: &str) -> Result<Option<VerifyKind>, OptionError> {
    match text {
        "0" | "none" => Ok(None),
        "crc32c" | "crc32c-intel" => Ok(Some(VerifyKind::Crc32c)),
        "md5" => Ok(Some(VerifyKind::Md5)),
        _ => Err(OptionError::bad_value(text, "unsupported verify kind (supported: crc32c, crc32c-intel, md5, 0)")),
    }
}

/// fio's `filename=a:b:c` list; `\:` is a colon inside a name. An `rbd:` name is one target
/// (its colons separate librados options), as QEMU spells it; so is an NBD URI.
pub fn split_filenames(text: &str) -> Vec<String> {
    if text.starts_with("rbd:") || tandem_drivers::nbd::is_nbd_uri(text) {
        return vec![text.to_string()];
    }
    let mut names = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&':') => names.last_mut().expect("never empty").push(chars.next().expect(":")),
            ':' => names.push(String::new()),
            other => names.last_mut().expect("never empty").push(other),
        }
    }
    names.retain(|name| !name.is_empty());
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_direction_lists_follow_fio() {
        let both = parse_per_direction("1m").unwrap();
        assert_eq!((both.read, both.write), (Some(1 << 20), Some(1 << 20)));
        let write_only = parse_per_direction(",500k").unwrap();
        assert_eq!((write_only.read, write_only.write), (None, Some(500 << 10)));
        let three = parse_per_direction("300,200,300").unwrap();
        assert_eq!((three.read, three.write), (Some(300), Some(200)));
        assert_eq!(parse_per_direction("0").unwrap(), ReadWrite { read: None, write: None });
        assert!(parse_per_direction("1,2,3,4").is_err());
        assert!(parse_per_direction("fast").is_err());
    }

    #[test]
    fn bssplit_shares_add_to_100() {
        let split = parse_bssplit("64k/40:1024k/60,1024k/100").unwrap();
        assert_eq!(split.per_direction.read.len(), 2);
        assert_eq!((split.pick(false, 39), split.pick(false, 40)), (65536, 1 << 20));
        assert_eq!((split.pick(true, 0), split.max_bytes(), split.min_bytes()), (1 << 20, 1 << 20, 65536));
        let rest = parse_bssplit("4k/50:8k:16k").unwrap();
        let shares: Vec<u32> = rest.per_direction.read.iter().map(|entry| entry.percent).collect();
        assert_eq!(shares, [50, 25, 25]);
        let zero = parse_bssplit("4k/0:8k").unwrap();
        assert_eq!(zero.per_direction.read.iter().map(|entry| entry.percent).collect::<Vec<_>>(), [0, 100]);
        let short = parse_bssplit("4k/10:8k/20").unwrap();
        assert_eq!(short.per_direction.read.iter().map(|entry| entry.percent).sum::<u32>(), 100);
        for bad in ["4k/60:8k/50", "0/100", "4k/x", "4k/1/2/3", "a,b,c,d", "4k/4294967295:8k/4294967295"] {
            assert!(parse_bssplit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn engines_verify_and_ranges() {
        assert_eq!(parse_engine("libaio"), Ok(Engine::Async));
        assert_eq!(parse_engine("psync"), Ok(Engine::Sync));
        assert!(parse_engine("cpuio").unwrap_err().to_string().contains("'cpuio'"));
        assert_eq!(parse_verify("crc32c-intel"), Ok(Some(VerifyKind::Crc32c)));
        assert_eq!(parse_verify("0"), Ok(None));
        assert!(parse_verify("crc64").is_err());
        assert_eq!(parse_exit_what("stonewall"), Ok(ExitWhat::Stonewall));
        assert!(parse_exit_what("some").is_err());
        assert_eq!(parse_bsrange("4k-4k"), Ok(4096));
        assert!(parse_bsrange("4k-64k").is_err());
    }

    #[test]
    fn filename_lists_split_on_unescaped_colons() {
        assert_eq!(split_filenames("a:b:c"), ["a", "b", "c"]);
        assert_eq!(split_filenames(r"a\:1:b"), ["a:1", "b"]);
        assert_eq!(split_filenames("rbd:pool/img:conf=/etc/ceph.conf"), ["rbd:pool/img:conf=/etc/ceph.conf"]);
        assert_eq!(split_filenames("nbd://h:10809/e"), ["nbd://h:10809/e"]);
        assert_eq!(split_filenames("nbd+unix:///e?socket=/s"), ["nbd+unix:///e?socket=/s"]);
    }
}
