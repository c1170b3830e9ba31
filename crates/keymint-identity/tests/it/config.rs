//! The configuration as the TOML file has it.

use keymint_identity::{Alg, IdentityConfig, JwksSource, Profile, Verifier};

const EXAMPLE: &str = r#"
max_token_size = 16384

[[jwt]]
name = "github"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["https://keymint.example.com"]
jwks = "discovery"
profile = "github_actions"
bound_claims = { repository_owner_id = ["123456"] }  # example-org's numeric id

[[jwt]]
name = "prod-cluster"
issuer = "https://oidc.prod.example.com"
audiences = ["keymint"]
jwks = { url = "https://oidc.prod.example.com/openid/v1/jwks" }
profile = "kubernetes"
algorithms = ["RS256"]
leeway = "10s"
max_lifetime = "2h"
jwks_min_refresh_interval = "1m"
claim_mappings = { pod_namespace_uid = "kubernetes.io.pod.uid" }

[[jwt]]
name = "spire"
profile = "spiffe"
trust_domain = "prod.example.org"
audiences = ["keymint"]
jwks = { file = "/run/spire/bundle.jwks" }
workload_id = "{sub}"

[[jwt]]
name = "internal"
issuer = "https://idp.internal.example"
audiences = ["keymint"]
jwks = { inline = '{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"1"}]}' }
workload_id = "svc:{client_id}"
"#;

#[test]
fn the_documented_example_parses_and_builds() {
    let c: IdentityConfig = toml::from_str(EXAMPLE).unwrap();
    assert_eq!(c.jwt.len(), 4);
    assert_eq!(c.jwt[0].jwks, JwksSource::Discovery);
    assert_eq!(c.jwt[0].algorithms, Alg::ALL.to_vec());
    assert_eq!(c.jwt[0].leeway_secs, 30);
    assert_eq!(c.jwt[1].profile, Some(Profile::Kubernetes));
    assert_eq!(c.jwt[1].leeway_secs, 10);
    assert_eq!(c.jwt[1].max_lifetime_secs, 7200);
    assert_eq!(c.jwt[1].jwks_min_refresh_interval_secs, 60);
    assert_eq!(c.jwt[2].trust_domain.as_deref(), Some("prod.example.org"));
    let v = Verifier::from_config(c).unwrap();
    assert_eq!(
        v.issuer_names().collect::<Vec<_>>(),
        ["github", "prod-cluster", "spire", "internal"]
    );
}

fn build(extra: &str) -> String {
    let toml = format!(
        "[[jwt]]\nname = \"x\"\nissuer = \"https://x.test\"\naudiences = [\"a\"]\njwks = {{ url = \"https://x.test/jwks\" }}\n{extra}"
    );
    match toml::from_str::<IdentityConfig>(&toml) {
        Err(e) => e.to_string(),
        Ok(c) => match Verifier::from_config(c) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        },
    }
}

#[test]
fn unsafe_or_unknown_settings_are_refused() {
    assert_eq!(build(""), "ok");
    for (extra, want) in [
        (
            "algorithms = [\"HS256\"]",
            "algorithm `HS256` is not allowed",
        ),
        ("algorithms = [\"none\"]", "algorithm `none` is not allowed"),
        ("algorithms = [\"rs256\"]", "not allowed"),
        ("algorithms = []", "`algorithms` must not be empty"),
        ("leeway = \"6m\"", "`leeway` is at most 300s"),
        ("leeway = \"soon\"", "invalid duration"),
        ("max_lifetime = 0", "`max_lifetime` must be positive"),
        ("jwks_min_refresh_interval = \"0s\"", "must be positive"),
        ("audience = \"a\"", "unknown field `audience`"),
        ("profile = \"gitlab\"", "unknown variant `gitlab`"),
        ("trust_domain = \"a.test\"", "spiffe profile only"),
        ("workload_id = \"static\"", "names no claim"),
        (
            "claim_mappings = { repository = \"repo\" }\nprofile = \"github_actions\"",
            "set by the profile",
        ),
        (
            "claim_mappings = { \"bad name\" = \"x\" }",
            "attribute name",
        ),
        (
            "jwks_max_age = \"2h\"\njwks_max_stale = \"1h\"",
            "`jwks_max_stale` (3600s) must be at least `jwks_max_age` (7200s)",
        ),
        // The default `jwks_max_stale` is 24 h.
        (
            "jwks_max_age = \"25h\"",
            "`jwks_max_stale` (86400s) must be at least `jwks_max_age` (90000s)",
        ),
        ("jwks_max_age = \"25h\"\njwks_max_stale = \"25h\"", "ok"),
        ("jwks_max_stale = \"2h\"", "ok"),
        (
            "jwks_max_stale = \"721h\"",
            "`jwks_max_stale` is at most 30 days",
        ),
        ("jwks_max_stale = \"soon\"", "invalid duration"),
        // GitHub names can be re-registered by someone else: the workload
        // id and the bound claims must rest on the numeric ids.
        (
            "profile = \"github_actions\"\nworkload_id = \"gh:{repository}@{ref}\"",
            "identity issuer `x`: the github_actions profile's `workload_id` must include `{repository_id}`",
        ),
        (
            "profile = \"github_actions\"\nbound_claims = { repository_owner = [\"o\"] }",
            "identity issuer `x`: `bound_claims.repository_owner` binds a GitHub name",
        ),
        (
            "profile = \"github_actions\"\nbound_claims = { repository = [\"o/r\"] }",
            "`bound_claims.repository` binds a GitHub name",
        ),
        (
            "profile = \"github_actions\"\nbound_claims = { repository_owner = [\"o\"], repository_owner_id = [\"1\"] }",
            "ok",
        ),
        (
            "profile = \"github_actions\"\nworkload_id = \"gh:{repository_id}@{ref}\"",
            "ok",
        ),
    ] {
        let got = build(extra);
        assert!(got.contains(want), "{extra}: {got}");
    }
    let http = "[[jwt]]\nname = \"x\"\nissuer = \"https://x.test\"\naudiences = [\"a\"]\njwks = { url = \"http://x.test/jwks\" }\n";
    let c: IdentityConfig = toml::from_str(http).unwrap();
    assert!(
        Verifier::from_config(c)
            .unwrap_err()
            .to_string()
            .contains("dangerous_allow_http")
    );
    let c: IdentityConfig = toml::from_str(&format!("{http}dangerous_allow_http = true")).unwrap();
    assert!(Verifier::from_config(c).is_ok());
    let none = "[[jwt]]\nname = \"x\"\nissuer = \"https://x.test\"\naudiences = []\njwks = \"discovery\"\n";
    let c: IdentityConfig = toml::from_str(none).unwrap();
    assert!(
        Verifier::from_config(c)
            .unwrap_err()
            .to_string()
            .contains("`audiences`")
    );
    let spiffe = "[[jwt]]\nname = \"s\"\nprofile = \"spiffe\"\naudiences = [\"a\"]\njwks = \"discovery\"\ntrust_domain = \"a.test\"\n";
    let c: IdentityConfig = toml::from_str(spiffe).unwrap();
    assert!(
        Verifier::from_config(c)
            .unwrap_err()
            .to_string()
            .contains("needs `issuer`")
    );
    let dup = "[[jwt]]\nname = \"x\"\nissuer = \"https://x.test\"\naudiences = [\"a\"]\njwks = \"discovery\"\n";
    let c: IdentityConfig = toml::from_str(&format!(
        "{dup}{}",
        dup.replace("name = \"x\"", "name = \"y\"")
    ))
    .unwrap();
    assert!(
        Verifier::from_config(c)
            .unwrap_err()
            .to_string()
            .contains("two issuers")
    );
}

/// Claim mappings may not fill tags that other identity methods set: a
/// policy reading `uid`, `node` or `svid` without checking
/// `principal.method` must not be satisfiable by a JWT's claim.
#[test]
fn claim_mappings_may_not_take_names_other_methods_set() {
    use keymint_identity::config::OTHER_METHODS_ATTRIBUTES;
    let names: Vec<&str> = OTHER_METHODS_ATTRIBUTES.iter().map(|(n, _)| *n).collect();
    // Every name local attestation fills in (and a node agent reports),
    // what a node adds, an X.509-SVID's, a JWT-SVID's, an OAuth client's.
    for want in keymint_attest::OBSERVED_ATTRIBUTES.iter().chain(&[
        "node",
        "entry",
        "trust_domain",
        "svid",
        "spiffe_path",
        "client_id",
    ]) {
        assert!(names.contains(want), "`{want}` is not reserved");
    }
    for (name, by) in OTHER_METHODS_ATTRIBUTES {
        for profile in ["", "profile = \"kubernetes\"\n"] {
            let got = build(&format!(
                "{profile}claim_mappings = {{ {name} = \"some.claim\" }}"
            ));
            let want = format!(
                "identity issuer `x`: `claim_mappings.{name}` (claim `some.claim`): `{name}` is a tag that {by} sets"
            );
            // The Kubernetes profile sets `node` itself.
            let own = profile.contains("kubernetes") && *name == "node";
            assert!(
                got.contains(&want) || (own && got.contains("set by the profile")),
                "{profile}{name}: {got}"
            );
        }
    }
    // Other names stay free.
    assert_eq!(
        build("claim_mappings = { team = \"team\", uid_hint = \"uid\" }"),
        "ok"
    );
}
