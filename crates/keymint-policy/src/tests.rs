#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use super::*;

/// The tests below ask what a policy decides, not how fast: a debug build
/// on a loaded machine can take longer than [`DECISION_BUDGET`], whose
/// overrun denies. They decide with a roomy budget; the budget itself is
/// tested apart (`a_decision_over_its_budget_denies_and_says_it_timed_out`).
trait Roomy {
    fn decided(&self, q: &Query) -> Decision;
}

impl Roomy for PolicySet {
    fn decided(&self, q: &Query) -> Decision {
        self.decide_within(q, Duration::from_secs(30))
    }
}

fn schema() -> PolicySchema {
    PolicySchema::new().unwrap()
}

fn set(src: &str) -> Result<PolicySet, PolicyError> {
    PolicySet::from_sources(&schema(), &[(PathBuf::from("test.cedar"), src.to_owned())])
}

fn query(action: Action, workload: &str, role: &str) -> Query {
    Query {
        action,
        principal: Principal {
            id: workload.into(),
            method: "jwt".into(),
            issuer: "https://token.actions.githubusercontent.com".into(),
            attributes: [("repository".to_owned(), "acme/bot".to_owned())].into(),
        },
        role: RoleFacts {
            name: role.into(),
            engine: "token".into(),
            scopes: vec!["llm:chat".into()],
            max_ttl_secs: 3600,
        },
        context: RequestFacts {
            intent: "triage".into(),
            environment: "prod".into(),
            time: 1_800_000_000,
            ttl_secs: 600,
            scopes: vec!["llm:chat".into()],
            ..RequestFacts::default()
        },
    }
}

const POLICY: &str = r#"
@id("bot-may-triage")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue"], resource == Keymint::Role::"triage")
when { principal.hasTag("repository") && principal.getTag("repository") == "acme/bot" && context.ttl_secs <= 900 };

forbid(principal, action, resource)
when { context.environment == "prod" && context.intent like "*delete*" };

@id("db-needs-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource == Keymint::Role::"db-write");
"#;

#[test]
fn the_shipped_schema_loads() {
    schema();
}

#[test]
fn permits_forbids_and_names_the_deciding_policies() {
    let s = set(POLICY).unwrap();
    assert_eq!(
        s.ids(),
        ["bot-may-triage", "db-needs-a-human", "test.cedar:2"]
    );
    let d = s.decided(&query(Action::StartTask, "github:acme/bot", "triage"));
    assert_eq!(d.verdict, Verdict::Allow, "{d:?}");
    assert_eq!(d.policies, ["bot-may-triage"]);

    // The forbid wins and is named.
    let mut q = query(Action::StartTask, "github:acme/bot", "triage");
    q.context.intent = "delete old rows".into();
    let d = s.decided(&q);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.policies, ["test.cedar:2"]);
    assert!(d.reason().contains("forbidden by test.cedar:2"));

    // Another repository, a longer TTL, another role: no permit applies.
    let mut q = query(Action::StartTask, "github:evil/fork", "triage");
    q.principal
        .attributes
        .insert("repository".into(), "evil/fork".into());
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
    let mut q = query(Action::Issue, "github:acme/bot", "triage");
    q.context.ttl_secs = 3600;
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
    let d = s.decided(&query(Action::Renew, "github:acme/bot", "triage"));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason(), "no policy permits this request");
}

#[test]
fn an_approval_policy_holds_until_approved() {
    let s = set(POLICY).unwrap();
    let mut q = query(Action::Issue, "github:acme/bot", "db-write");
    let d = s.decided(&q);
    assert_eq!(d.verdict, Verdict::NeedsApproval);
    assert_eq!(d.policies, ["db-needs-a-human"]);
    q.context.approved = true;
    assert_eq!(s.decided(&q).verdict, Verdict::Allow);
}

#[test]
fn an_empty_set_denies_everything() {
    let s = PolicySet::empty(schema());
    let d = s.decided(&query(Action::StartTask, "x", "triage"));
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn invalid_policies_are_refused_with_a_clear_message() {
    // Parse error.
    let e = set("permit(principal, action, resource").unwrap_err();
    assert!(matches!(e, PolicyError::Parse { .. }), "{e}");
    // Unknown attribute: strict validation against the schema.
    let e = set(r#"permit(principal, action, resource) when { context.colour == "red" };"#)
        .unwrap_err();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("colour"), "{e}");
    // Unknown action.
    let e =
        set(r#"permit(principal, action == Keymint::Action::"destroy", resource);"#).unwrap_err();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e}");
    // Two policies with one id.
    let e = set(r#"@id("a") permit(principal, action, resource);
           @id("a") forbid(principal, action, resource);"#)
    .unwrap_err();
    assert!(matches!(e, PolicyError::DuplicateId { .. }), "{e}");
    // Templates are refused.
    let e = set("permit(principal == ?principal, action, resource);").unwrap_err();
    assert!(e.to_string().contains("templates"), "{e}");
}

#[test]
fn an_evaluation_error_denies_even_if_another_policy_permits() {
    // Strict validation rules out most runtime errors (a missing tag or
    // optional attribute must be guarded with `has`); overflow remains.
    let s = set(
        r#"@id("all") permit(principal, action, resource);
           @id("overflow") forbid(principal, action, resource) when { context.ttl_secs + 9223372036854775807 < 0 };"#,
    )
    .unwrap();
    let d = s.decided(&query(Action::Issue, "w", "triage"));
    assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
    assert!(!d.errors.is_empty());
    assert!(d.reason().starts_with("policy error"));
}

#[test]
fn hostile_names_are_data_not_policy() {
    let s = set(
        r#"permit(principal == Keymint::Workload::"alice", action, resource == Keymint::Role::"triage");"#,
    )
    .unwrap();
    for evil in [
        r#"alice", action, resource); permit(principal"#,
        "alice\"",
        "alice\0",
        "",
    ] {
        let d = s.decided(&query(Action::Issue, evil, "triage"));
        assert_eq!(d.verdict, Verdict::Deny, "{evil:?}");
    }
    assert_eq!(
        s.decided(&query(Action::Issue, "alice", "triage")).verdict,
        Verdict::Allow
    );
}

#[test]
fn source_ip_is_usable_when_present() {
    let s = set(
        r#"permit(principal, action, resource) when { context has source_ip && context.source_ip.isLoopback() };"#,
    )
    .unwrap();
    let mut q = query(Action::Issue, "w", "triage");
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
    q.context.source_ip = Some("127.0.0.1".parse().unwrap());
    assert_eq!(s.decided(&q).verdict, Verdict::Allow);
    q.context.source_ip = Some("10.1.2.3".parse().unwrap());
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
}

/// The `ip` value of each address is made once and kept: every decision
/// still sees its own request's address, over more addresses than are
/// kept, IPv4 and IPv6 alike.
#[test]
fn kept_ip_values_are_each_requests_own() {
    let s = set(
        r#"permit(principal, action, resource) when { context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8")) };"#,
    )
    .unwrap();
    let mut q = query(Action::Issue, "w", "triage");
    for round in 0..2 {
        for i in 0..(super::IP_VALUES_MAX as u32 + 50) {
            let inside = i % 3 == 0;
            let ip: IpAddr = if inside {
                std::net::Ipv4Addr::from(0x0a00_0000 + i).into()
            } else if i % 3 == 1 {
                std::net::Ipv4Addr::from(0x0b00_0000 + i).into()
            } else {
                std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)).into()
            };
            q.context.source_ip = Some(ip);
            let want = if inside {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            assert_eq!(s.decided(&q).verdict, want, "{ip} in round {round}");
        }
    }
}

#[test]
fn files_and_directories_load_and_oversized_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.cedar"), POLICY).unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        r#"@id("ops") permit(principal, action == Keymint::Action::"renew", resource);"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let s = PolicySet::load(&schema(), &[dir.path().to_owned()]).unwrap();
    assert_eq!(s.sources().len(), 2);
    assert!(s.ids().contains(&"ops".to_owned()));
    assert!(s.ids().contains(&"b.cedar:2".to_owned()));

    let big = dir.path().join("big.cedar");
    std::fs::write(&big, vec![b' '; (MAX_FILE_BYTES + 1) as usize]).unwrap();
    let e = PolicySet::load(&schema(), &[big]).unwrap_err();
    assert!(matches!(e, PolicyError::TooLarge { .. }));
    let e = PolicySet::load(&schema(), &[dir.path().join("missing.cedar")]).unwrap_err();
    assert!(matches!(e, PolicyError::Read { .. }));
}

#[test]
fn cases_files_check_expected_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "bot starts a triage task"
action = "start_task"
principal = { id = "github:acme/bot", method = "jwt", attributes = { repository = "acme/bot" } }
role = { name = "triage", engine = "token", scopes = ["llm:chat"] }
context = { intent = "triage", environment = "prod", ttl_secs = 900 }
expect = "allow"
decided_by = ["bot-may-triage"]

[[case]]
name = "a wrong expectation fails"
action = "issue"
principal = { id = "github:acme/bot" }
role = { name = "db-write" }
expect = "allow"
"#,
    )
    .unwrap();
    let s = set(POLICY).unwrap();
    let out = cases::run(&s, &cases::read(&cases).unwrap());
    assert!(out[0].passed, "{:?}", out[0]);
    assert!(!out[1].passed);
    assert_eq!(out[1].got, Verdict::NeedsApproval);

    std::fs::write(&cases, "[[case]]\nname = \"x\"\nbogus = 1\n").unwrap();
    let e = cases::read(&cases).unwrap_err();
    assert!(e.contains("bogus") || e.contains("unknown"), "{e}");
}

#[test]
fn role_scoped_policies_apply_to_their_role_only_and_general_ones_to_all() {
    let s = set(
        r#"@id("x-permit") permit(principal, action, resource == Keymint::Role::"x");
           @id("x-in-permit") permit(principal, action == Keymint::Action::"renew", resource in Keymint::Role::"y");
           @id("all-forbid-prod") forbid(principal, action, resource) when { context.environment == "prod" };
           @id("is-role") permit(principal, action == Keymint::Action::"delegate", resource is Keymint::Role);"#,
    )
    .unwrap();
    let mut q = query(Action::Issue, "w", "x");
    q.context.environment = "dev".into();
    assert_eq!(s.decided(&q).verdict, Verdict::Allow);
    q.role.name = "y".into();
    assert_eq!(
        s.decided(&q).verdict,
        Verdict::Deny,
        "x's permit is not y's"
    );
    q.action = Action::Renew;
    assert_eq!(s.decided(&q).policies, ["x-in-permit"]);
    q.role.name = "z".into();
    q.action = Action::Delegate;
    assert_eq!(
        s.decided(&q).policies,
        ["is-role"],
        "a role no policy names"
    );
    q.context.environment = "prod".into();
    for role in ["x", "y", "z"] {
        q.role.name = role.into();
        let d = s.decided(&q);
        assert_eq!(d.verdict, Verdict::Deny, "{role}");
        assert_eq!(d.policies, ["all-forbid-prod"], "{role}");
    }
}

#[test]
fn a_policy_that_cannot_join_its_roles_set_is_a_load_error() {
    // Two policies under one id (which `from_sources` refuses before this
    // point): the role's `forbid` cannot join a set that holds the general
    // `permit`. Left out, it would fail open.
    let permit = Policy::parse(
        Some(PolicyId::new("p")),
        "permit(principal, action, resource);",
    )
    .unwrap();
    let forbid = Policy::parse(
        Some(PolicyId::new("p")),
        r#"forbid(principal, action, resource == Keymint::Role::"x");"#,
    )
    .unwrap();
    let e = index_by_role([&permit, &forbid]).unwrap_err();
    assert!(
        matches!(&e, PolicyError::Index { id, role, .. } if id == "p" && role == "x"),
        "{e}"
    );
}

#[test]
fn a_decision_over_its_budget_denies_and_says_it_timed_out() {
    let s = set(POLICY).unwrap();
    let q = query(Action::StartTask, "github:acme/bot", "triage");
    let d = s.decide_within(&q, Duration::ZERO);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.timed_out, "{d:?}");
    assert!(d.reason().contains("longer than"), "{}", d.reason());
    // A timed-out denial is not kept: the same query asked again within
    // its budget is decided on its merits.
    assert_eq!(s.decisions.len(), 0);
    let d = s.decided(&q);
    assert_eq!((d.verdict, d.timed_out), (Verdict::Allow, false));
    // A denial on the merits is not a timeout.
    let d = s.decided(&query(Action::StartTask, "x", "nope"));
    assert_eq!((d.verdict, d.timed_out), (Verdict::Deny, false));
}

/// Decisions are kept by their whole query (`Decisions`): a query asked
/// again is answered as it was, and a query that differs from a kept one
/// in any one fact is decided on its own facts. The policy reads every
/// fact of the query, so each change below turns the kept allow into a
/// deny; a cache keyed on fewer facts would answer allow.
#[test]
fn kept_decisions_answer_only_the_same_query() {
    const EVERY_FACT: &str = r#"
@id("all-facts")
permit(principal == Keymint::Workload::"wl-1", action == Keymint::Action::"issue", resource == Keymint::Role::"triage")
when {
  principal.method == "jwt" && principal.issuer == "https://issuer.test" &&
  principal.hasTag("repository") && principal.getTag("repository") == "acme/bot" &&
  resource.engine == "token" && resource.scopes.contains("llm:chat") && resource.max_ttl_secs == 3600 &&
  context.intent == "triage" && context.purpose == "p" && context.environment == "prod" &&
  context.subject == "s" && context.destination == "d" && context.time == 1800000000 &&
  context.approved == false && context.scopes == ["llm:chat"] && context.principals == ["u"] &&
  context.ttl_secs == 600 && context.task == "t1" && context.parent_task == "t0" &&
  context.delegation_depth == 1 && context.delegation_chain == ["a"] &&
  context has source_ip && context.source_ip == ip("10.0.0.1") &&
  context has oauth && context.oauth.client_id == "c1" && context.oauth.dpop &&
  context has mcp && context.mcp.tool == "search"
};
"#;
    let s = set(EVERY_FACT).unwrap();
    let mut base = query(Action::Issue, "wl-1", "triage");
    base.principal.issuer = "https://issuer.test".into();
    let c = &mut base.context;
    c.purpose = "p".into();
    c.subject = "s".into();
    c.destination = "d".into();
    c.principals = vec!["u".into()];
    c.task = "t1".into();
    c.parent_task = "t0".into();
    c.delegation_depth = 1;
    c.delegation_chain = vec!["a".into()];
    c.source_ip = Some("10.0.0.1".parse().unwrap());
    c.oauth = Some(OAuthFacts {
        client_id: "c1".into(),
        dpop: true,
        ..OAuthFacts::default()
    });
    c.mcp = Some(McpFacts {
        tool: "search".into(),
        ..McpFacts::default()
    });
    let first = s.decided(&base);
    assert_eq!(first.verdict, Verdict::Allow, "{first:?}");
    assert_eq!(s.decisions.len(), 1);
    assert_eq!(s.decided(&base), first);
    assert_eq!(
        s.decisions.len(),
        1,
        "asked again, the kept decision answers"
    );

    type Change = fn(&mut Query);
    let changes: &[(&str, Change)] = &[
        ("action", |q| q.action = Action::StartTask),
        ("principal id", |q| q.principal.id = "wl-2".into()),
        ("method", |q| q.principal.method = "spiffe".into()),
        ("issuer", |q| {
            q.principal.issuer = "https://other.test".into()
        }),
        ("tag", |q| {
            q.principal
                .attributes
                .insert("repository".into(), "acme/other".into());
        }),
        ("role engine", |q| q.role.engine = "sql".into()),
        ("role scopes", |q| q.role.scopes = vec!["db:read".into()]),
        ("role max ttl", |q| q.role.max_ttl_secs = 60),
        ("intent", |q| q.context.intent = "delete".into()),
        ("purpose", |q| q.context.purpose = "q".into()),
        ("environment", |q| q.context.environment = "dev".into()),
        ("subject", |q| q.context.subject = "x".into()),
        ("destination", |q| q.context.destination = "x".into()),
        ("time", |q| q.context.time += 1),
        ("approved", |q| q.context.approved = true),
        ("scopes", |q| q.context.scopes.push("db:read".into())),
        ("principals", |q| q.context.principals.clear()),
        ("ttl", |q| q.context.ttl_secs = 601),
        ("task", |q| q.context.task = "t2".into()),
        ("parent task", |q| q.context.parent_task = String::new()),
        ("depth", |q| q.context.delegation_depth = 2),
        ("chain", |q| q.context.delegation_chain.push("b".into())),
        ("source ip", |q| {
            q.context.source_ip = Some("10.0.0.2".parse().unwrap());
        }),
        ("no source ip", |q| q.context.source_ip = None),
        ("oauth", |q| {
            if let Some(o) = q.context.oauth.as_mut() {
                o.dpop = false;
            }
        }),
        ("no oauth", |q| q.context.oauth = None),
        ("mcp", |q| {
            if let Some(m) = q.context.mcp.as_mut() {
                m.tool = "delete".into();
            }
        }),
    ];
    for (what, change) in changes {
        let mut q = base.clone();
        change(&mut q);
        let d = s.decided(&q);
        assert_eq!(d.verdict, Verdict::Deny, "{what}: {d:?}");
        // And a set that never saw `base` decides the same.
        assert_eq!(set(EVERY_FACT).unwrap().decided(&q), d, "{what}");
    }
    // The kept allow still answers its own query.
    assert_eq!(s.decided(&base), first);
    // A reload (a copy) keeps nothing.
    assert_eq!(s.clone().decisions.len(), 0);
}

/// The entities of a (principal, role) pair are cached per set: every
/// decision must still see the facts it is asked with, so a role or an
/// identity whose facts changed is decided on the new facts, never on the
/// cached ones, and an approval's operator is not a workload of the same
/// name.
#[test]
fn cached_entities_follow_changed_roles_and_identities() {
    let s = set(r#"
@id("role-scope")
permit(principal, action == Keymint::Action::"issue", resource)
when { resource.scopes.contains("llm:chat") && resource.max_ttl_secs <= 3600 };

@id("repo")
permit(principal, action == Keymint::Action::"start_task", resource)
when { principal.hasTag("repository") && principal.getTag("repository") == "acme/bot" };

@id("operator")
permit(principal is Keymint::Operator, action == Keymint::Action::"approve", resource);
"#)
    .unwrap();
    let mut q = query(Action::Issue, "bot", "triage");
    for _ in 0..3 {
        assert_eq!(s.decided(&q).verdict, Verdict::Allow);
    }
    // The role was edited: its scopes no longer hold what the policy needs.
    q.role.scopes = vec!["llm:embed".into()];
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
    q.role.scopes = vec!["llm:chat".into()];
    q.role.max_ttl_secs = 7200;
    assert_eq!(s.decided(&q).verdict, Verdict::Deny);
    q.role.max_ttl_secs = 3600;
    assert_eq!(s.decided(&q).verdict, Verdict::Allow);
    // The same workload name with other claims.
    let mut t = query(Action::StartTask, "bot", "triage");
    assert_eq!(s.decided(&t).verdict, Verdict::Allow);
    t.principal
        .attributes
        .insert("repository".into(), "evil/fork".into());
    assert_eq!(s.decided(&t).verdict, Verdict::Deny);
    t.principal.attributes.clear();
    assert_eq!(s.decided(&t).verdict, Verdict::Deny);
    // An operator named like a cached workload is still an operator, and
    // the workload is still a workload after it.
    let a = query(Action::Approve, "bot", "triage");
    assert_eq!(s.decided(&a).verdict, Verdict::Allow);
    let w = query(Action::Approve, "bot", "triage");
    assert_eq!(s.decided(&w).verdict, Verdict::Allow);
    let mut i = query(Action::Approve, "bot", "triage");
    i.action = Action::Issue;
    assert_eq!(s.decided(&i).verdict, Verdict::Allow);
    // More pairs than the cache keeps: every decision is still right.
    for n in 0..(ENTITY_CACHE_MAX + 10) {
        let mut q = query(Action::Issue, &format!("w{n}"), "triage");
        if n % 2 == 1 {
            q.role.scopes.clear();
        }
        let want = if n % 2 == 0 {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let d = s.decided(&q);
        assert_eq!(d.verdict, want, "pair {n}: {}", d.reason());
    }
}

/// Policies whose decisions read every optional part of the context.
const SHAPE_POLICY: &str = r#"
@id("by-oauth")
permit(principal, action, resource)
when { context has oauth && context.oauth.grant_type == "client_credentials" && context.oauth.actor_chain.contains("agent-a") };

@id("by-mcp")
permit(principal, action, resource)
when { context has mcp && context.mcp.tool == "search" && context.mcp.argument_keys.containsAll(["q"]) };

@id("by-address")
permit(principal, action, resource)
when { context has source_ip && context.source_ip.isLoopback() };

@id("approvers")
permit(principal is Keymint::Operator, action == Keymint::Action::"approve", resource)
when { context.scopes.isEmpty() };

forbid(principal, action, resource)
when { context.delegation_depth > 3 || context.delegation_chain.contains("banned") };
"#;

/// Every request shape [`Shapes`] tells apart (each action, with and
/// without each optional context record), each with empty and with filled
/// strings, sets and records: each validates against the schema when
/// first met (no error), and once its shape is recorded a request built
/// without the schema decides exactly as a validated one.
#[test]
fn every_request_shape_validates_and_decides_as_when_validated() {
    let warm = set(SHAPE_POLICY).unwrap();
    let mut seen = 0;
    for action in Action::ALL {
        for shape in 0u8..8 {
            for filled in [false, true] {
                let mut q = query(action, "wl-1", "triage");
                let c = &mut q.context;
                if !filled {
                    *c = RequestFacts::default();
                    q.role.scopes.clear();
                    q.principal.attributes.clear();
                } else {
                    c.delegation_chain = vec!["agent-a".into(), "banned".into()];
                    c.delegation_depth = 1;
                    c.principals = vec!["deploy".into()];
                    c.source_ip = None;
                }
                if shape & 1 != 0 {
                    c.oauth = Some(if filled {
                        OAuthFacts {
                            grant_type: "client_credentials".into(),
                            resource: "https://mcp.example.test/".into(),
                            client_id: "c1".into(),
                            actor_chain: vec!["agent-a".into()],
                            dpop: true,
                        }
                    } else {
                        OAuthFacts::default()
                    });
                }
                if shape & 2 != 0 {
                    c.mcp = Some(if filled {
                        McpFacts {
                            server: "docs".into(),
                            method: "tools/call".into(),
                            tool: "search".into(),
                            argument_keys: vec!["q".into()],
                            argument_types: vec!["q:string".into()],
                            ..McpFacts::default()
                        }
                    } else {
                        McpFacts::default()
                    });
                }
                if shape & 4 != 0 {
                    c.source_ip = Some(if filled {
                        "::1".parse().unwrap()
                    } else {
                        "10.0.0.1".parse().unwrap()
                    });
                }
                // A set of its own validates this request when deciding it.
                let fresh = set(SHAPE_POLICY).unwrap();
                assert!(!fresh.shapes.validated(&q));
                let validated = fresh.decided(&q);
                assert!(
                    validated.errors.is_empty(),
                    "{action:?} shape {shape} filled {filled}: {:?}",
                    validated.errors
                );
                assert!(fresh.shapes.validated(&q), "a valid shape is recorded");
                // The shared set has seen this shape (first pass: the
                // empty request, validated now; second: the filled one,
                // built without the schema).
                let unvalidated = warm.decided(&q);
                assert!(warm.shapes.validated(&q));
                assert_eq!(
                    unvalidated, validated,
                    "{action:?} shape {shape} filled {filled}"
                );
                seen += 1;
            }
        }
    }
    assert_eq!(seen, Action::ALL.len() * 8 * 2);
    // The policies are not vacuous here: each kind of verdict occurs.
    let mut q = query(Action::Issue, "wl-1", "triage");
    q.context.source_ip = Some("127.0.0.1".parse().unwrap());
    assert_eq!(warm.decided(&q).verdict, Verdict::Allow);
    q.context.delegation_chain = vec!["banned".into()];
    assert_eq!(warm.decided(&q).verdict, Verdict::Deny);
}

/// A copy of a policy set (as a reload makes a new one) has recorded no
/// shape: its first request of each shape is validated again.
#[test]
fn a_copy_of_a_policy_set_validates_its_first_requests_again() {
    let s = set(SHAPE_POLICY).unwrap();
    let mut q = query(Action::Approve, "alice", "triage");
    q.context.scopes.clear();
    assert_eq!(s.decided(&q).verdict, Verdict::Allow);
    assert!(s.shapes.validated(&q));
    let copy = s.clone();
    assert!(!copy.shapes.validated(&q), "a copy validates again");
}

/// A full map drops one entry to make room, never more: it holds at most
/// `N` values, always the one just put, and a key put again replaces its
/// value without dropping another.
#[test]
fn kept_values_stay_bounded_one_entry_at_a_time() {
    let kept: Kept<u32, u32, 4> = Kept::default();
    for k in 0..4 {
        kept.put(k, k);
    }
    assert_eq!(kept.lock().len(), 4);
    kept.put(2, 20);
    assert_eq!(kept.lock().len(), 4, "a key put again drops nothing");
    assert_eq!(kept.get(&2), Some(20));
    for k in 4..100 {
        kept.put(k, k);
        assert_eq!(kept.lock().len(), 4);
        assert_eq!(kept.get(&k), Some(k));
    }
}

/// `Action::ALL` lists every action once, each at its own slot, so that
/// every action's shapes are recorded (`Shapes` keeps one byte per slot).
#[test]
fn every_action_is_listed_once_at_its_slot() {
    for (i, a) in Action::ALL.iter().enumerate() {
        assert_eq!(*a as usize, i, "{a:?}");
    }
    let names: HashSet<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(names.len(), Action::ALL.len());
    // Every action the schema declares is in the list.
    for name in [
        "start_task",
        "issue",
        "renew",
        "delegate",
        "use",
        "approve",
        "call_tool",
        "read_resource",
        "get_prompt",
    ] {
        assert!(names.contains(name), "{name}");
    }
}
