//! Scanning one stream of bytes: gzip detection, binary skip, chunking with
//! overlap (memory stays bounded on a 2 GB single-line file), line and column
//! numbers, pairing, and locations inside structured documents.

use std::io::{self, Read};

use crate::decode;
use crate::engine::{Engine, RawMatch};
use crate::finding::{Encoding, Fingerprinter, Location, Paired, Secret, Source, redact};
use crate::structured;

/// Bytes scanned at once; with the overlap, the most a worker holds. A
/// stream that fits in one chunk is scanned whole (structured locations).
pub const CHUNK: usize = 8 << 20;
/// The chunk of a file known to be larger than [`CHUNK`], which is read
/// in pieces whatever their size: small enough that the kernel's copy and
/// every pass of the prefilter find it in the core's cache.
pub const LARGE_FILE_CHUNK: usize = 1 << 20;
/// Bytes looked at to decide that content is binary.
const SNIFF: usize = 8 << 10;

/// One secret seen at one place, before grouping.
#[derive(Debug, Clone)]
pub struct Hit {
    pub rule: usize,
    pub secret: Secret,
    pub fingerprint: String,
    pub location: Location,
    pub paired_with: Option<Paired>,
}

/// What happened to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Scanned { bytes: u64 },
    Binary,
}

/// The per-thread state of content scanning.
#[derive(Debug)]
pub struct ContentScanner<'a> {
    pub engine: &'a Engine,
    pub fingerprinter: &'a Fingerprinter,
    buf: Vec<u8>,
}

/// Is this the start of a gzip stream?
pub fn is_gzip(head: &[u8]) -> bool {
    head.len() >= 3 && head[0] == 0x1f && head[1] == 0x8b && head[2] == 8
}

/// Text in UTF-16 (PowerShell's `Out-File`, `regedit` exports, files saved
/// as "Unicode" on Windows) starts with a byte order mark: `Some(true)`
/// for little-endian, `Some(false)` for big-endian. Without the mark its
/// NUL bytes make it binary.
pub fn utf16_bom(head: &[u8]) -> Option<bool> {
    match head {
        [0xFF, 0xFE, ..] => Some(true),
        [0xFE, 0xFF, ..] => Some(false),
        _ => None,
    }
}

/// UTF-16 read as UTF-8, in a stream: the byte order mark dropped, a lone
/// surrogate or a final odd byte shown as U+FFFD. Lines and columns are
/// then those of the UTF-8 text.
struct Utf16Reader<R> {
    inner: R,
    little_endian: bool,
    /// A byte read without its pair.
    odd: Option<u8>,
    /// A high surrogate waiting for the next read's low one.
    high: Option<u16>,
    started: bool,
    out: Vec<u8>,
    at: usize,
    raw: Vec<u8>,
}

impl<R: Read> Utf16Reader<R> {
    fn new(inner: R, little_endian: bool) -> Self {
        Self {
            inner,
            little_endian,
            odd: None,
            high: None,
            started: false,
            out: Vec::new(),
            at: 0,
            raw: vec![0; 64 << 10],
        }
    }

    /// Decodes the next block into `out`; `false` at the end.
    fn refill(&mut self) -> io::Result<bool> {
        self.out.clear();
        self.at = 0;
        let n = self.inner.read(&mut self.raw)?;
        if n == 0 {
            if self.odd.take().is_some() || self.high.take().is_some() {
                self.out.extend_from_slice("\u{FFFD}".as_bytes());
                return Ok(true);
            }
            return Ok(false);
        }
        let mut units: Vec<u16> = Vec::with_capacity(n / 2 + 2);
        units.extend(self.high.take());
        let little_endian = self.little_endian;
        let pair = |a: u8, b: u8| {
            if little_endian {
                u16::from_le_bytes([a, b])
            } else {
                u16::from_be_bytes([a, b])
            }
        };
        let mut tail = &self.raw[..n];
        if let Some(a) = self.odd.take()
            && let Some((&b, rest)) = tail.split_first()
        {
            units.push(pair(a, b));
            tail = rest;
        }
        let mut chunks = tail.chunks_exact(2);
        for c in &mut chunks {
            units.push(pair(c[0], c[1]));
        }
        self.odd = chunks.remainder().first().copied();
        if let Some(&last) = units.last()
            && (0xD800..0xDC00).contains(&last)
        {
            self.high = units.pop();
        }
        if !self.started && !units.is_empty() {
            self.started = true;
            if units.first() == Some(&0xFEFF) {
                units.remove(0);
            }
        }
        for c in char::decode_utf16(units) {
            let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
            let mut b = [0u8; 4];
            self.out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        }
        Ok(true)
    }
}

impl<R: Read> Read for Utf16Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.out.len() {
            if !self.refill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Binary content: a NUL byte near the start.
pub fn looks_binary(head: &[u8]) -> bool {
    memchr::memchr(0, &head[..head.len().min(SNIFF)]).is_some()
}

/// Where a chunk sits in its stream.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Offset of the chunk's first byte.
    base: u64,
    /// Line number at the chunk's first byte.
    line_base: u64,
    /// Offset of the last line feed before the chunk.
    last_nl: Option<u64>,
    /// End of the previous chunk (the chunks overlap).
    prev_end: u64,
    /// The stream ends with this chunk.
    eof: bool,
}

impl Cursor {
    /// Whether what ends at `end` of a chunk of `len` bytes is reported
    /// from another chunk: seen whole in the previous one, or possibly
    /// going on in the next (found again there).
    fn elsewhere(&self, end: usize, len: usize) -> bool {
        self.base + (end as u64) < self.prev_end || (!self.eof && end == len)
    }
}

/// Line and column of places in one chunk, counted forward.
#[derive(Debug)]
struct Lines {
    at: Cursor,
    line: u64,
    counted: usize,
}

impl Lines {
    fn new(at: Cursor) -> Self {
        Self {
            at,
            line: at.line_base,
            counted: 0,
        }
    }

    /// Line and 1-based byte column of `start`, which is not before the
    /// place asked last.
    fn at(&mut self, hay: &[u8], start: usize) -> (u64, u64) {
        self.line += memchr::memchr_iter(b'\n', &hay[self.counted..start]).count() as u64;
        self.counted = start;
        let column = match memchr::memrchr(b'\n', &hay[..start]) {
            Some(p) => (start - p) as u64,
            None => self.at.base + start as u64 - self.at.last_nl.map_or(0, |n| n + 1) + 1,
        };
        (self.line, column)
    }
}

impl<'a> ContentScanner<'a> {
    pub fn new(engine: &'a Engine, fingerprinter: &'a Fingerprinter) -> Self {
        Self {
            engine,
            fingerprinter,
            buf: Vec::new(),
        }
    }

    /// [`ContentScanner::scan_reader`] of a stream known to hold `len`
    /// bytes: one larger than a chunk is read in [`LARGE_FILE_CHUNK`]s
    /// (it is cut into chunks either way, and structured locations need
    /// it whole).
    pub fn scan_reader_of_len(
        &mut self,
        reader: impl Read,
        len: u64,
        source: &Source,
        name: &str,
        out: &mut Vec<Hit>,
    ) -> io::Result<Outcome> {
        let chunk = if len > CHUNK as u64 {
            LARGE_FILE_CHUNK
        } else {
            CHUNK
        };
        self.scan_reader_in(reader, chunk, source, name, out)
    }

    /// Whether the content just skipped as binary is a tar archive (the
    /// first chunk is kept until the next scan).
    pub fn last_was_tar(&self) -> bool {
        self.buf.get(257..262) == Some(b"ustar".as_slice())
    }

    /// Scans an in-memory blob (gzip is decompressed, binary is skipped).
    pub fn scan_bytes(
        &mut self,
        data: &[u8],
        source: &Source,
        name: &str,
        out: &mut Vec<Hit>,
    ) -> io::Result<Outcome> {
        if is_gzip(data) || utf16_bom(data).is_some() {
            return self.scan_reader(data, source, name, out);
        }
        if looks_binary(data) {
            return Ok(Outcome::Binary);
        }
        let start = out.len();
        let at = Cursor {
            base: 0,
            line_base: 1,
            last_nl: None,
            prev_end: 0,
            eof: true,
        };
        self.scan_chunk(data, at, source, out);
        self.finish(data, name, &mut out[start..]);
        Ok(Outcome::Scanned {
            bytes: data.len() as u64,
        })
    }

    /// Scans a stream of any length in bounded memory.
    pub fn scan_reader(
        &mut self,
        reader: impl Read,
        source: &Source,
        name: &str,
        out: &mut Vec<Hit>,
    ) -> io::Result<Outcome> {
        self.scan_reader_in(reader, CHUNK, source, name, out)
    }

    /// [`ContentScanner::scan_reader`] in chunks of `chunk` bytes.
    fn scan_reader_in(
        &mut self,
        mut reader: impl Read,
        chunk: usize,
        source: &Source,
        name: &str,
        out: &mut Vec<Hit>,
    ) -> io::Result<Outcome> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // The first chunk is read at once: most files fit in it.
        let first = fill(&mut reader, &mut buf, chunk);
        let result = if is_gzip(&buf) {
            let head = std::mem::take(&mut buf);
            let mut dec = flate2::read::MultiGzDecoder::new(io::Cursor::new(head).chain(reader));
            self.scan_loop(&mut dec, &mut buf, chunk, None, source, name, out)
        } else if let Some(little_endian) = utf16_bom(&buf) {
            let head = std::mem::take(&mut buf);
            let mut dec = Utf16Reader::new(io::Cursor::new(head).chain(reader), little_endian);
            self.scan_loop(&mut dec, &mut buf, chunk, None, source, name, out)
        } else {
            let first = match first {
                Ok(n) => (n < chunk, None),
                Err(e) => (true, Some(e)),
            };
            self.scan_loop(&mut reader, &mut buf, chunk, Some(first), source, name, out)
        };
        if buf.capacity() <= 2 * CHUNK {
            self.buf = buf;
        }
        result
    }

    /// Reads `chunk` bytes at a time; `prefilled`: the first chunk is
    /// already in `buf`, with whether the stream ended and the error that
    /// ended it.
    #[expect(
        clippy::too_many_arguments,
        reason = "one stream's reader, buffer, chunk and names, passed down once"
    )]
    fn scan_loop(
        &mut self,
        reader: &mut impl Read,
        buf: &mut Vec<u8>,
        chunk: usize,
        mut prefilled: Option<(bool, Option<io::Error>)>,
        source: &Source,
        name: &str,
        out: &mut Vec<Hit>,
    ) -> io::Result<Outcome> {
        let overlap = self.engine.overlap();
        let start_hits = out.len();
        let mut base: u64 = 0; // offset of buf[0]
        let mut line_base: u64 = 1; // line number at buf[0]
        let mut last_nl: Option<u64> = None; // offset of the last '\n' before buf[0]
        let mut prev_end: u64 = 0; // end of the previous chunk
        let mut first = true;
        loop {
            // On a read error (a truncated gzip stream), what was read is
            // still scanned, then the error is returned.
            let (eof, err) = match prefilled.take() {
                Some(p) => p,
                None => {
                    let want = chunk.saturating_sub(buf.len());
                    match fill(reader, buf, want) {
                        Ok(got) => (got < want, None),
                        Err(e) => (true, Some(e)),
                    }
                }
            };
            if first {
                first = false;
                if looks_binary(buf) {
                    return Ok(Outcome::Binary);
                }
            }
            let at = Cursor {
                base,
                line_base,
                last_nl,
                prev_end,
                eof,
            };
            self.scan_chunk(buf, at, source, out);
            if eof {
                let total = base + buf.len() as u64;
                // Whole content in one chunk: structured locations are possible.
                if base == 0 {
                    self.finish(buf, name, &mut out[start_hits..]);
                } else {
                    pair(self.engine, &mut out[start_hits..]);
                }
                return match err {
                    Some(e) => Err(e),
                    None => Ok(Outcome::Scanned { bytes: total }),
                };
            }
            prev_end = base + buf.len() as u64;
            let keep_from = buf.len().saturating_sub(overlap);
            let dropped = &buf[..keep_from];
            line_base += memchr::memchr_iter(b'\n', dropped).count() as u64;
            if let Some(p) = memchr::memrchr(b'\n', dropped) {
                last_nl = Some(base + p as u64);
            }
            base += keep_from as u64;
            buf.drain(..keep_from);
        }
    }

    /// Scans `hay` (the chunk at `at` in the stream) and appends hits.
    fn scan_chunk(&self, hay: &[u8], at: Cursor, source: &Source, out: &mut Vec<Hit>) {
        let (matches, hinted) = self.engine.scan_hinted(hay);
        let decoded = if hinted {
            self.scan_decoded(hay, at, source, out)
        } else {
            Vec::new()
        };
        let mut lines = Lines::new(at);
        for m in matches {
            // A run whose decoding holds a key is reported as that key; the
            // run itself under a secret's name (`OPENAI_API_KEY: c2st…` in a
            // Kubernetes `Secret`) is the same secret, not a second one.
            if at.elsewhere(m.end, hay.len())
                || decoded.iter().any(|r| r.start <= m.start && m.end <= r.end)
            {
                continue;
            }
            let (line, column) = lines.at(hay, m.start);
            out.push(self.hit(hay, m, source, line, column, at.base));
        }
    }

    /// Secrets inside the base64 runs of `hay` ([`decode`]), whose words
    /// say it holds encoded values: each run that decodes to text is
    /// scanned again between the text around it, and a match inside the
    /// decoded part is a hit at the run's place. Returns the runs that held
    /// one.
    fn scan_decoded(
        &self,
        hay: &[u8],
        at: Cursor,
        source: &Source,
        out: &mut Vec<Hit>,
    ) -> Vec<std::ops::Range<usize>> {
        let mut found = Vec::new();
        let mut lines = Lines::new(at);
        let mut text = Vec::new();
        for (start, end) in decode::runs(hay) {
            if at.elsewhere(end, hay.len()) {
                continue;
            }
            let Some(decoded) = decode::decode_text(&hay[start..end]) else {
                continue;
            };
            let before = &hay[start.saturating_sub(decode::CONTEXT)..start];
            // The padding is the run's, not the text after it (a rule whose
            // secret may hold `=` would take it for part of the decoded key).
            let padding = hay[end..]
                .iter()
                .take(2)
                .take_while(|&&b| b == b'=')
                .count();
            let after = &hay[end + padding..(end + padding + decode::CONTEXT).min(hay.len())];
            text.clear();
            text.extend_from_slice(before);
            text.extend_from_slice(&decoded);
            text.extend_from_slice(after);
            let inside = before.len()..before.len() + decoded.len();
            let matches: Vec<RawMatch> = self
                .engine
                .scan(&text)
                .into_iter()
                .filter(|m| inside.start <= m.start && m.end <= inside.end)
                .collect();
            if matches.is_empty() {
                continue;
            }
            let (line, column) = lines.at(hay, start);
            for m in matches {
                let mut hit = self.hit(&text, m, source, line, column, at.base);
                hit.location.offset = at.base + start as u64;
                hit.location.encoding = Some(Encoding::Base64);
                out.push(hit);
            }
            found.push(start..end + padding);
        }
        found
    }

    fn hit(
        &self,
        hay: &[u8],
        m: RawMatch,
        source: &Source,
        line: u64,
        column: u64,
        base: u64,
    ) -> Hit {
        let secret = String::from_utf8_lossy(&hay[m.start..m.end]).into_owned();
        Hit {
            rule: m.rule,
            fingerprint: self.fingerprinter.fingerprint(secret.as_bytes()),
            secret: Secret::new(secret),
            location: Location {
                source: source.clone(),
                line,
                column,
                offset: base + m.start as u64,
                context: None,
                encoding: None,
            },
            paired_with: None,
        }
    }

    fn finish(&self, data: &[u8], name: &str, hits: &mut [Hit]) {
        if hits.is_empty() {
            return;
        }
        pair(self.engine, hits);
        structured::label(data, name, hits);
    }
}

/// Links each hit of a rule with `pairs_with` to the nearest hit of the
/// named rule in the same content.
fn pair(engine: &Engine, hits: &mut [Hit]) {
    for i in 0..hits.len() {
        let Some(want) = engine.rule(hits[i].rule).pair else {
            continue;
        };
        let at = hits[i].location.offset;
        let best = hits
            .iter()
            .filter(|h| h.rule == want)
            .min_by_key(|h| h.location.offset.abs_diff(at))
            .map(|h| Paired {
                rule_id: engine.rule(h.rule).spec.id.clone(),
                fingerprint: h.fingerprint.clone(),
                redacted: redact(h.secret.expose()),
            });
        hits[i].paired_with = best;
    }
}

/// Reads until `want` more bytes are in `buf` or the stream ends.
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
    let before = buf.len();
    reader.take(want as u64).read_to_end(buf)?;
    Ok(buf.len() - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        let body = "PqYUG2mfCIMQZKWJVBtn3tfLH7pNRu";
        format!(
            "ghp_{body}{}",
            keymint_core::token::checksum(body.as_bytes())
        )
    }

    fn scan_reader(data: &[u8]) -> (Outcome, Vec<Hit>) {
        let engine = Engine::with_rules(&[]).unwrap();
        let fp = Fingerprinter::default();
        let mut cs = ContentScanner::new(&engine, &fp);
        let mut out = Vec::new();
        let o = cs.scan_reader(data, &Source::Stdin, "x", &mut out).unwrap();
        (o, out)
    }

    #[test]
    fn lines_and_columns_are_one_based() {
        let text = format!("a\nbb\n  token = {}\n", key());
        let (_, hits) = scan_reader(text.as_bytes());
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].location.line, hits[0].location.column), (3, 11));
    }

    #[test]
    fn keys_across_chunk_boundaries_are_found_once_with_right_positions() {
        let (data, expected) = keys_straddling(CHUNK, 0);
        let (o, hits) = scan_reader(&data);
        assert_keys_at(&data, o, &hits, &expected);
    }

    /// A file known to be larger than a chunk is read in smaller ones, with
    /// the same overlap: every key is found once, where it is.
    #[test]
    fn a_large_files_smaller_chunks_find_every_key_once_where_it_is() {
        let (data, expected) = keys_straddling(LARGE_FILE_CHUNK, CHUNK + 1);
        assert!(data.len() > CHUNK);
        let engine = Engine::with_rules(&[]).unwrap();
        let fp = Fingerprinter::default();
        let mut cs = ContentScanner::new(&engine, &fp);
        let mut hits = Vec::new();
        let o = cs
            .scan_reader_of_len(&data[..], data.len() as u64, &Source::Stdin, "x", &mut hits)
            .unwrap();
        assert_keys_at(&data, o, &hits, &expected);
        // Read a megabyte at a time: the buffer never grew to a chunk.
        assert!(cs.buf.capacity() < CHUNK, "{}", cs.buf.capacity());
        // The next stream of unknown length is read in whole chunks.
        let (o, hits) = {
            let mut hits = Vec::new();
            let o = cs.scan_reader(&data[..], &Source::Stdin, "x", &mut hits);
            (o.unwrap(), hits)
        };
        assert_keys_at(&data, o, &hits, &expected);
        assert!(cs.buf.capacity() >= CHUNK, "{}", cs.buf.capacity());
    }

    /// Text with keys placed so that some straddle the edges of `chunk`-
    /// sized chunks, filled up to `len` bytes; and where each key starts.
    fn keys_straddling(chunk: usize, len: usize) -> (Vec<u8>, Vec<u64>) {
        let k = key();
        let mut data = Vec::new();
        let mut expected = Vec::new();
        for (i, at) in [
            100usize,
            chunk - 20,
            chunk + 200,
            2 * chunk - 16_400,
            2 * chunk - 100,
            3 * chunk - 30,
        ]
        .into_iter()
        .enumerate()
        {
            while data.len() < at {
                data.extend_from_slice(if i % 2 == 0 {
                    b"filler text "
                } else {
                    b"line\n"
                });
            }
            data.truncate(at);
            data.push(b' ');
            expected.push(data.len() as u64);
            data.extend_from_slice(k.as_bytes());
            data.push(b' ');
        }
        while data.len() < len {
            data.extend_from_slice(b"tail\n");
        }
        (data, expected)
    }

    fn assert_keys_at(data: &[u8], o: Outcome, hits: &[Hit], expected: &[u64]) {
        assert_eq!(
            o,
            Outcome::Scanned {
                bytes: data.len() as u64
            }
        );
        let offsets: Vec<u64> = hits.iter().map(|h| h.location.offset).collect();
        assert_eq!(offsets, expected);
        for h in hits {
            let off = h.location.offset as usize;
            let line = data[..off].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
            let col = off
                - data[..off]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1)
                + 1;
            assert_eq!((h.location.line, h.location.column), (line, col as u64));
        }
    }

    #[test]
    fn gzip_is_decompressed_and_binary_is_skipped() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(format!("TOKEN={}\n", key()).as_bytes())
            .unwrap();
        let gz = enc.finish().unwrap();
        let (_, hits) = scan_reader(&gz);
        assert_eq!(hits.len(), 1);

        let mut bin = vec![0u8, 1, 2, 3];
        bin.extend_from_slice(key().as_bytes());
        let (o, hits) = scan_reader(&bin);
        assert_eq!(o, Outcome::Binary);
        assert!(hits.is_empty());
    }

    #[test]
    fn aws_secret_is_paired_with_its_key_id() {
        // Built here so that no key-shaped literal sits in the source.
        let id = format!("{}{}", "AK", "IAU7QFQZKWJVBB5NDX");
        let text = format!(
            "[default]\naws_access_key_id = {id}\naws_secret_access_key = SHJ9bC4hGmJKNLu5QZKWJVBqkUuavTUdyOluxamr\n"
        );
        let (_, hits) = scan_reader(text.as_bytes());
        assert_eq!(hits.len(), 2);
        let secret = hits.iter().find(|h| h.paired_with.is_some()).unwrap();
        let id = hits.iter().find(|h| h.paired_with.is_none()).unwrap();
        assert_eq!(
            secret.paired_with.as_ref().unwrap().fingerprint,
            id.fingerprint
        );
    }
}
