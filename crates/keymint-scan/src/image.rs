//! Container images: `docker save` tarballs (`manifest.json`) and OCI image
//! layouts (`index.json`, `blobs/sha256/…`), as a tar file. Every layer is
//! scanned in order, including files that a later layer deletes (marked
//! `deleted_later`), and so is the image config, whose environment variables
//! and build history often carry keys baked into the image.
//!
//! The outer archive is indexed once (entry offsets), then layers are read
//! in place with seeks: nothing is extracted to disk. A truncated or corrupt
//! archive is reported and whatever could be read is still scanned.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crossbeam_channel::Sender;
use serde_json::Value;

use crate::content::ContentScanner;
use crate::finding::Source;
use crate::pipeline::{QUEUE_BLOB_MAX, Severity, Shared, Work};

#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// Whiteouts seen in one image, applied to its hits when the scan ends.
#[derive(Debug, Default, Clone)]
pub(crate) struct ImageWhiteouts {
    pub image: String,
    /// Layer names in order.
    pub layers: Vec<String>,
    /// (layer position, path deleted, whole directory made opaque)
    pub deletions: Vec<(usize, String, bool)>,
}

pub(crate) fn scan_image(
    path: &Path,
    tx: &Sender<Work>,
    shared: &Shared<'_>,
    cs: &mut ContentScanner<'_>,
) {
    let image = path.display().to_string();
    let index = match index_archive(path) {
        Ok((index, None)) => index,
        Ok((index, Some(err))) => {
            shared.issue(
                Severity::Error,
                image.clone(),
                format!("truncated or corrupt image archive, scanning the {} entries before the damage: {err}", index.len()),
            );
            index
        }
        Err(e) => {
            shared.issue(
                Severity::Error,
                image,
                format!("cannot read image archive: {e}"),
            );
            return;
        }
    };
    let read_entry = |name: &str| -> Option<Vec<u8>> {
        let span = index.get(name)?;
        let mut f = File::open(path).ok()?;
        f.seek(SeekFrom::Start(span.offset)).ok()?;
        let mut v = Vec::new();
        f.take(span.size).read_to_end(&mut v).ok()?;
        Some(v)
    };

    let (config, layers) = match read_entry("manifest.json") {
        Some(m) => docker_manifest(&m),
        None => match read_entry("index.json") {
            Some(i) => oci_manifest(&i, &read_entry),
            None => (None, Vec::new()),
        },
    };
    let mut layers = layers;
    if layers.is_empty() {
        // No manifest (or it was lost to truncation): every tar-looking entry
        // is a layer, in archive order.
        let mut names: Vec<(&String, &Span)> = index.iter().collect();
        names.sort_by_key(|(_, s)| s.offset);
        layers = names
            .into_iter()
            .filter(|(n, _)| {
                n.ends_with(".tar") || n.ends_with(".tar.gz") || n.starts_with("blobs/")
            })
            .map(|(n, _)| n.clone())
            .collect();
    }

    if let Some(cfg_name) = &config
        && let Some(data) = read_entry(cfg_name)
    {
        let source = Source::Image {
            image: image.clone(),
            layer: "config".into(),
            path: cfg_name.clone(),
            deleted_later: false,
        };
        shared.scan_blob(cs, &data, &source, "config.json");
    }

    let mut whiteouts = ImageWhiteouts {
        image: image.clone(),
        layers: layers.clone(),
        deletions: Vec::new(),
    };
    for (pos, layer) in layers.iter().enumerate() {
        let Some(span) = index.get(layer) else {
            shared.issue(
                Severity::Error,
                format!("{image}: {layer}"),
                "layer listed in the manifest is missing from the archive",
            );
            continue;
        };
        if let Err(e) = scan_layer(
            path,
            *span,
            &image,
            layer,
            pos,
            tx,
            shared,
            cs,
            &mut whiteouts,
        ) {
            shared.issue(
                Severity::Error,
                format!("{image}: {layer}"),
                format!("layer truncated or corrupt, scanned up to the damage: {e}"),
            );
        }
    }
    if let Ok(mut w) = shared.whiteouts.lock() {
        w.push(whiteouts);
    }
}

/// Entry name → span of its content, and the error that stopped the
/// indexing, if any.
fn index_archive(path: &Path) -> std::io::Result<(HashMap<String, Span>, Option<String>)> {
    let f = File::open(path)?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut index = HashMap::new();
    let entries = ar.entries_with_seek()?;
    let file_len = std::fs::metadata(path)?.len();
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(err) => return Ok((index, Some(err.to_string()))),
        };
        let name = match e.path() {
            Ok(p) => p.to_string_lossy().trim_start_matches("./").to_owned(),
            Err(err) => return Ok((index, Some(err.to_string()))),
        };
        let span = Span {
            offset: e.raw_file_position(),
            size: e.size(),
        };
        if span.offset + span.size > file_len {
            return Ok((
                index,
                Some(format!("entry `{name}` runs past the end of the file")),
            ));
        }
        index.insert(name, span);
    }
    Ok((index, None))
}

fn docker_manifest(data: &[u8]) -> (Option<String>, Vec<String>) {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(data) else {
        return (None, Vec::new());
    };
    let Some(first) = items.first() else {
        return (None, Vec::new());
    };
    let config = first
        .get("Config")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let layers = first
        .get("Layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    (config, layers)
}

fn blob_path(digest: &str) -> Option<String> {
    let (alg, hex) = digest.split_once(':')?;
    Some(format!("blobs/{alg}/{hex}"))
}

fn oci_manifest(
    index: &[u8],
    read: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> (Option<String>, Vec<String>) {
    let mut doc: Value = match serde_json::from_slice(index) {
        Ok(v) => v,
        Err(_) => return (None, Vec::new()),
    };
    // An index may point at another index (multi-platform); follow the first.
    for _ in 0..4 {
        if let Some(m) = doc
            .get("manifests")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            let Some(next) = m
                .get("digest")
                .and_then(Value::as_str)
                .and_then(blob_path)
                .and_then(|p| read(&p))
                .and_then(|d| serde_json::from_slice(&d).ok())
            else {
                return (None, Vec::new());
            };
            doc = next;
            continue;
        }
        break;
    }
    let config = doc
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .and_then(blob_path);
    let layers = doc
        .get("layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|l| l.get("digest").and_then(Value::as_str).and_then(blob_path))
                .collect()
        })
        .unwrap_or_default();
    (config, layers)
}

#[expect(
    clippy::too_many_arguments,
    reason = "one layer of one image, plain parameters"
)]
fn scan_layer(
    path: &Path,
    span: Span,
    image: &str,
    layer: &str,
    pos: usize,
    tx: &Sender<Work>,
    shared: &Shared<'_>,
    cs: &mut ContentScanner<'_>,
    whiteouts: &mut ImageWhiteouts,
) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(span.offset))?;
    let mut r = BufReader::with_capacity(1 << 16, f.take(span.size));
    let head = r.fill_buf()?;
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        shared.issue(
            Severity::Error,
            format!("{image}: {layer}"),
            "zstd-compressed layers are not supported yet: skipped",
        );
        return Ok(());
    }
    if crate::content::is_gzip(head) {
        scan_tar(
            flate2::read::MultiGzDecoder::new(r),
            image,
            layer,
            pos,
            tx,
            shared,
            cs,
            whiteouts,
        )
    } else {
        scan_tar(r, image, layer, pos, tx, shared, cs, whiteouts)
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one layer of one image, plain parameters"
)]
fn scan_tar(
    r: impl Read,
    image: &str,
    layer: &str,
    pos: usize,
    tx: &Sender<Work>,
    shared: &Shared<'_>,
    cs: &mut ContentScanner<'_>,
    whiteouts: &mut ImageWhiteouts,
) -> std::io::Result<()> {
    let mut ar = tar::Archive::new(r);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let file_name = name.rsplit('/').next().unwrap_or(&name);
        if let Some(deleted) = file_name.strip_prefix(".wh.") {
            let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
            let opaque = deleted == ".wh..opq";
            let target = if opaque {
                dir.to_owned()
            } else if dir.is_empty() {
                deleted.to_owned()
            } else {
                format!("{dir}/{deleted}")
            };
            whiteouts.deletions.push((pos, target, opaque));
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let source = Source::Image {
            image: image.to_owned(),
            layer: layer.to_owned(),
            path: name.clone(),
            deleted_later: false,
        };
        let size = entry.size();
        if size as usize <= QUEUE_BLOB_MAX {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data)?;
            if tx.send(Work::Blob { data, source, name }).is_err() {
                return Ok(());
            }
        } else {
            shared.scan_stream(cs, &mut entry, &source, &name, false);
        }
    }
    Ok(())
}

/// Marks image hits whose file a later layer deleted.
pub(crate) fn apply_whiteouts(all: &[ImageWhiteouts], hits: &mut [crate::content::Hit]) {
    for hit in hits {
        let Source::Image {
            image,
            layer,
            path,
            deleted_later,
        } = &mut hit.location.source
        else {
            continue;
        };
        let Some(w) = all.iter().find(|w| &w.image == image) else {
            continue;
        };
        let Some(pos) = w.layers.iter().position(|l| l == layer) else {
            continue;
        };
        *deleted_later = w.deletions.iter().any(|(p, target, opaque)| {
            *p > pos
                && (path == target
                    || (*opaque || !target.is_empty())
                        && path.starts_with(target.as_str())
                        && path.as_bytes().get(target.len()) == Some(&b'/'))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::Hit;
    use crate::finding::{Location, Secret};

    fn hit(layer: &str, path: &str) -> Hit {
        Hit {
            rule: 0,
            secret: Secret::new("s".into()),
            fingerprint: String::new(),
            location: Location {
                source: Source::Image {
                    image: "img.tar".into(),
                    layer: layer.into(),
                    path: path.into(),
                    deleted_later: false,
                },
                line: 1,
                column: 1,
                offset: 0,
                context: None,
                encoding: None,
            },
            paired_with: None,
        }
    }

    fn deleted(h: &Hit) -> bool {
        matches!(
            h.location.source,
            Source::Image {
                deleted_later: true,
                ..
            }
        )
    }

    #[test]
    fn whiteouts_mark_files_of_earlier_layers_only() {
        let w = ImageWhiteouts {
            image: "img.tar".into(),
            layers: vec!["l1".into(), "l2".into(), "l3".into()],
            deletions: vec![
                (1, "app/.env".into(), false),
                (2, "secrets".into(), true),
                (1, "cache".into(), false),
            ],
        };
        let mut hits = vec![
            hit("l1", "app/.env"),
            hit("l2", "app/.env"),
            hit("l1", "secrets/a.txt"),
            hit("l1", "cache/deep/x"),
            hit("l1", "cache2/x"),
            hit("l3", "secrets/b.txt"),
        ];
        apply_whiteouts(&[w], &mut hits);
        let marks: Vec<bool> = hits.iter().map(deleted).collect();
        // The file itself, a file under an opaque directory, a file under a
        // deleted directory; not a file re-added in the deleting layer, not a
        // sibling with a common prefix, not a file of the last layer.
        assert_eq!(marks, [true, false, true, true, false, false]);
    }
}
