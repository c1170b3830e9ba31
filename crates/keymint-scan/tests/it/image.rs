//! Container images built by the test: `docker save` and OCI layouts, layers
//! in order, files deleted by a later layer, the config's environment, and a
//! truncated tarball.

use std::io::Write;

use serde_json::json;

use crate::{Rng, anthropic_key, findings, github_token, openai_key, p, run_json};

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

struct Keys {
    deleted: String,
    kept: String,
    env: String,
}

fn layers(rng: &mut Rng) -> (Keys, Vec<u8>, Vec<u8>, Vec<u8>) {
    let keys = Keys {
        deleted: github_token(rng),
        kept: anthropic_key(rng),
        env: openai_key(rng),
    };
    let big_filler = "x = 1\n".repeat(50_000);
    let l1 = tar_of(&[
        (
            "app/.env",
            format!("GITHUB_TOKEN={}\n", keys.deleted).as_bytes(),
        ),
        ("app/main.py", big_filler.as_bytes()),
    ]);
    let l2 = tar_of(&[
        ("app/.wh..env", b""),
        (
            "app/settings.py",
            format!("ANTHROPIC_API_KEY = \"{}\"\n", keys.kept).as_bytes(),
        ),
    ]);
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin", format!("OPENAI_API_KEY={}", keys.env)], "Cmd": ["python"]},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [{"created_by": "COPY . /app"}]
    })
    .to_string()
    .into_bytes();
    (keys, l1, l2, config)
}

fn check(doc: &serde_json::Value, keys: &Keys) {
    let fs = findings(doc);
    let by_rule = |rule: &str| {
        fs.iter()
            .find(|f| f["rule_id"] == rule)
            .unwrap_or_else(|| panic!("{rule} not found: {doc:#}"))["locations"][0]
            .clone()
    };
    let del = by_rule("github.token");
    assert_eq!(del["kind"], "image");
    assert_eq!(del["path"], "app/.env");
    assert_eq!(del["deleted_later"], true);
    let kept = by_rule("anthropic.api-key");
    assert_eq!(kept["path"], "app/settings.py");
    assert!(kept.get("deleted_later").is_none());
    let env = by_rule("openai.project-key");
    assert_eq!(env["layer"], "config");
    assert_eq!(
        env["context"],
        "image config, environment variable OPENAI_API_KEY"
    );
    assert_eq!(fs.len(), 3);
    let _ = keys;
}

#[test]
fn a_docker_save_tarball_is_scanned_layer_by_layer_with_its_config() {
    let mut rng = Rng::new();
    let (keys, l1, l2, config) = layers(&mut rng);
    let manifest = json!([{
        "Config": "abc123.json",
        "RepoTags": ["demo:latest"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"]
    }])
    .to_string();
    let image = tar_of(&[
        ("l1/layer.tar", &l1),
        ("l2/layer.tar", &l2),
        ("abc123.json", &config),
        ("manifest.json", manifest.as_bytes()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.tar");
    std::fs::write(&path, &image).unwrap();
    let (code, doc, err) = run_json(&["--image", p(&path)]);
    assert_eq!(code, 1, "{err}");
    check(&doc, &keys);

    // Cut inside the second layer: an error, and the first layer and the
    // config (before the cut) are still scanned.
    let cut = image.len() - manifest.len() - config.len() - l2.len() / 2 - 2048;
    let short = dir.path().join("short.tar");
    std::fs::write(&short, &image[..cut]).unwrap();
    let (code, doc, err) = run_json(&["--image", p(&short)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("error:") && err.contains("short.tar"), "{err}");
    assert!(
        findings(&doc)
            .iter()
            .any(|f| f["rule_id"] == "github.token"),
        "{doc:#}"
    );
}

#[test]
fn an_oci_layout_with_gzip_layers_is_scanned() {
    let mut rng = Rng::new();
    let (keys, l1, l2, config) = layers(&mut rng);
    let (g1, g2) = (gzip(&l1), gzip(&l2));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha256_hex(&g1)), "size": g1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha256_hex(&g2)), "size": g2.len()}
        ]
    })
    .to_string()
    .into_bytes();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha256_hex(&manifest)), "size": manifest.len()}]
    })
    .to_string();
    let blob = |d: &[u8]| format!("blobs/sha256/{}", sha256_hex(d));
    let image = tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", index.as_bytes()),
        (&blob(&manifest), &manifest),
        (&blob(&config), &config),
        (&blob(&g1), &g1),
        (&blob(&g2), &g2),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("oci.tar");
    std::fs::write(&path, &image).unwrap();
    let (code, doc, err) = run_json(&["--image", p(&path)]);
    assert_eq!(code, 1, "{err}");
    check(&doc, &keys);
}

#[test]
fn a_zstd_layer_is_reported_and_the_other_layers_are_scanned() {
    let mut rng = Rng::new();
    let (keys, l1, _l2, config) = layers(&mut rng);
    let zstd_layer = [0x28u8, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4];
    let manifest =
        json!([{"Config": "c.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).to_string();
    let image = tar_of(&[
        ("manifest.json", manifest.as_bytes()),
        ("c.json", &config),
        ("l1/layer.tar", &l1),
        ("l2/layer.tar", &zstd_layer),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.tar");
    std::fs::write(&path, &image).unwrap();
    let (code, doc, err) = run_json(&["--image", p(&path)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("zstd"), "{err}");
    let rules: Vec<&str> = findings(&doc)
        .iter()
        .map(|f| f["rule_id"].as_str().unwrap())
        .collect();
    assert!(
        rules.contains(&"github.token") && rules.contains(&"openai.project-key"),
        "{rules:?}"
    );
    let _ = keys;
}
