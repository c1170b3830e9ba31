//! Parsers for the `/proc` files that attestation reads. Pure functions over
//! text, so that their edge cases are unit-tested without a process.

/// Field 22 of `/proc/PID/stat`: the start time in clock ticks since boot.
///
/// The second field (`comm`) is in parentheses and may itself contain
/// spaces and parentheses, so the fields are counted from the *last* `)`.
pub(crate) fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After `)`: field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The unified (cgroup v2) path from `/proc/PID/cgroup`: the `0::` line.
/// `None` on a v1-only host.
pub(crate) fn cgroup_v2(cgroup: &str) -> Option<&str> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// The container id in a cgroup path, for the runtimes that put a 64-hex id
/// in it:
///
/// | runtime | component |
/// |---|---|
/// | Docker, cgroupfs driver | `/docker/<id>` |
/// | Docker, systemd driver | `docker-<id>.scope` |
/// | containerd (Kubernetes) | `/kubepods/.../pod<uid>/<id>`, `cri-containerd-<id>.scope` |
/// | CRI-O | `crio-<id>.scope` |
/// | Podman | `libpod-<id>.scope` (its `/container` child included) |
///
/// The **outermost** id wins: a container that may manage its own cgroups
/// (cgroup namespace plus delegation) can create children below its own
/// cgroup, named like any other container, but never above it. Conmon
/// (`libpod-conmon-<id>.scope`, `crio-conmon-<id>.scope`) is the runtime's
/// monitor, not the container, and yields no id.
pub(crate) fn container_id(cgroup: &str) -> Option<&str> {
    cgroup.split('/').find_map(container_id_component)
}

fn container_id_component(c: &str) -> Option<&str> {
    let c = c.strip_suffix(".scope").unwrap_or(c);
    if c.contains("conmon") {
        return None;
    }
    let id = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|p| c.strip_prefix(p))
    .unwrap_or(c);
    is_sha256_hex(id).then_some(id)
}

/// 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `Pid:` line of a pidfd's `/proc/self/fdinfo/FD`: the pid in the
/// reader's pid namespace, `-1` once the process has exited.
pub(crate) fn fdinfo_pid(fdinfo: &str) -> Option<i32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4b1c2d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
    const ID2: &str = "0000000000000000000000000000000000000000000000000000000000000abc";

    #[test]
    fn start_time_counts_from_the_last_paren() {
        let stat = "1234 (a) b (c) R 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 100 18446744073709551615";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("1 (x) R 1 2 3"), None);
        assert_eq!(start_time("no paren"), None);
    }

    #[test]
    fn start_time_of_this_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(start_time(&stat).unwrap() > 0);
    }

    #[test]
    fn cgroup_v2_line() {
        assert_eq!(
            cgroup_v2("0::/system.slice/agent.service\n"),
            Some("/system.slice/agent.service")
        );
        assert_eq!(
            cgroup_v2("12:cpu:/x\n1:name=systemd:/y\n0::/user.slice\n"),
            Some("/user.slice")
        );
        assert_eq!(cgroup_v2("12:cpu:/x\n"), None);
    }

    #[test]
    fn container_ids() {
        for path in [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/pod1234-5678/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            format!("/system.slice/containerd.service/k8s.io/{ID}"),
        ] {
            assert_eq!(container_id(&path), Some(ID), "{path}");
        }
    }

    #[test]
    fn outermost_container_id_wins() {
        // A container that names a child cgroup like another container.
        let path = format!("/system.slice/docker-{ID}.scope/{ID2}");
        assert_eq!(container_id(&path), Some(ID));
    }

    #[test]
    fn not_container_ids() {
        for path in [
            "/".to_owned(),
            "/system.slice/agent.service".to_owned(),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            format!("/docker/{}", &ID[..63]),
            format!("/docker/{}", ID.to_uppercase()),
            format!("/docker/{ID}0"),
            format!("/system.slice/evil-{ID}.scope"),
        ] {
            assert_eq!(container_id(&path), None, "{path}");
        }
    }

    #[test]
    fn fdinfo() {
        let s = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1234\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(fdinfo_pid(s), Some(4242));
        assert_eq!(fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(fdinfo_pid("pos:\t0\n"), None);
    }
}
