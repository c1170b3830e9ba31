//! Makes the same kind of decision an issuance makes, N times, for
//! instruction counts of the decision alone:
//! `valgrind --tool=callgrind target/release/examples/decide 2000`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use keymint_policy::{Action, PolicySchema, PolicySet, Principal, Query, RequestFacts, RoleFacts};

const POLICY: &str = r#"
@id("bot-may-issue")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue"], resource == Keymint::Role::"triage")
when { principal.hasTag("repository") && context.ttl_secs <= 900 };
forbid(principal, action, resource)
when { context.environment == "prod" && context.intent like "*delete*" };
"#;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a count"))
        .unwrap_or(1000);
    let schema = PolicySchema::new().unwrap();
    let set =
        PolicySet::from_sources(&schema, &[(PathBuf::from("p.cedar"), POLICY.to_owned())]).unwrap();
    let mut q = Query {
        action: Action::Issue,
        principal: Principal {
            id: "spiffe://example.org/ns/agents/sa/triage".into(),
            method: "jwt".into(),
            issuer: "https://token.actions.githubusercontent.com".into(),
            attributes: [("repository".to_owned(), "acme/bot".to_owned())].into(),
        },
        role: RoleFacts {
            name: "triage".into(),
            engine: "token".into(),
            scopes: vec!["llm:chat".into()],
            max_ttl_secs: 3600,
        },
        context: RequestFacts {
            intent: "triage the open issues".into(),
            environment: "prod".into(),
            destination: "api.openai.com".into(),
            ttl_secs: 600,
            scopes: vec!["llm:chat".into()],
            task: "tsk_01JEXAMPLE0000000000000000".into(),
            ..RequestFacts::default()
        },
    };
    let mut allowed = 0u64;
    for i in 0..n {
        q.context.time = 1_800_000_000 + i as i64;
        if set.decide(&q).verdict == keymint_policy::Verdict::Allow {
            allowed += 1;
        }
    }
    println!("{allowed} of {n} allowed");
}
