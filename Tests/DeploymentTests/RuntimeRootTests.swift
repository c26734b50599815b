import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// What the image's runtime stage promises, checked without a container engine: the release binary, built
/// with the Dockerfile's own `swift build` line (static Swift stdlib), runs from a Debian root made by
/// `debootstrap --variant=minbase` plus exactly the packages the Dockerfile's runtime stage installs, with
/// the root mounted read-only as the DaemonSet does (only the node lock directory writable).
///
/// The root is cached under /var/cache/hostnet-dnat-rootfs, keyed by suite, mirror and package list; the
/// release build is incremental in /var/cache/hostnet-dnat-build/release. A missing shared library, a
/// package the Dockerfile forgot, or a write outside the mounted lock directory fails here.
@Suite(.serialized) struct RuntimeRootTests {
    /// One run of the binary inside the root. Add a command with one more line in `commands`.
    struct RootCommand: Sendable, CustomStringConvertible {
        let args: [String]
        /// Run inside a fresh network namespace (as the pod's hostNetwork: the node's namespace).
        var inNamespace = false
        var timeout: Double = 120
        /// Extra inputs written to the root's /work before the run (name → contents), e.g. a kubeconfig.
        var files: [String: String] = [:]
        /// Checks the result; `ns` is the namespace when `inNamespace`.
        let check: @Sendable (ProcessResult, TestNamespace?) throws -> Void
        var description: String { args.joined(separator: " ") }
    }

    /// Inputs are copied into the root's /work (examples/cluster.yaml → /work/cluster.yaml).
    static let commands: [RootCommand] = [
        RootCommand(args: ["--version"]) { r, _ in
            #expect(r.succeeded, "\(r)")
            #expect(!r.stdout.isEmpty)
        },
        RootCommand(args: ["render", "-f", "/work/cluster.yaml", "--external-ip-cidr", "192.0.2.0/24"]) { r, _ in
            #expect(r.succeeded, "\(r)")
            let golden = try String(contentsOf: packageRoot.appendingPathComponent("examples/rendered/cluster.nft"), encoding: .utf8)
            #expect(r.stdout == golden, "the release binary renders differently from the golden file")
        },
        RootCommand(args: ["apply", "-f", "/work/cluster.yaml", "--external-ip-cidr", "192.0.2.0/24"], inNamespace: true) { r, ns in
            #expect(r.succeeded, "\(r)")
            // Read back by nft on the host, independently of our netlink code.
            let table = try #require(ns).nft("list", "table", "inet", "hostnet-dnat")
            #expect(table.contains("203.0.113.10 . tcp . 443"), "\(table)")
            #expect(table.contains("managed by hostnet-dnat"))
        },
        RootCommand(args: ["status", "--output", "json"], inNamespace: true) { r, _ in
            #expect(r.succeeded, "\(r)")
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            // A fresh namespace per command: nothing installed there yet, and reading that back works.
            #expect(json?["installed"] as? Bool == false, "\(r.stdout)")
        },
    ]

    static let tools = ["debootstrap", "chroot", "unshare", "nsenter", "mount", "nft", "swift"]

    @Test func theReleaseBinaryRunsInABookwormRootWithOnlyTheDockerfilesPackages() throws {
        guard try requireKernelTests(tools: Self.tools) else { return }
        let root = try RuntimeRoot.shared()
        for command in Self.commands {
            let ns = command.inNamespace ? try makeNamespace("rootfs") : nil
            defer { if let ns { _ = try? Tools.run("ip", ["netns", "delete", ns.name]) } }
            for (name, contents) in command.files {
                try contents.write(toFile: root.root + "/work/" + name, atomically: false, encoding: .utf8)
            }
            let r = try root.run(command.args, netns: ns, timeout: command.timeout)
            try command.check(r, ns)
        }
    }

    /// The node agent in the root: `sync` against a kube-apiserver stand-in (TLS, list + watch), programming a
    /// namespace it enters through /proc (as a pod reaches the node's), until it is stopped.
    @Test func syncRunsInTheRoot() throws {
        guard try requireKernelTests(tools: Self.tools + ["python3", "openssl"]) else { return }
        let root = try RuntimeRoot.shared()
        let cluster = try String(contentsOf: packageRoot.appendingPathComponent("examples/cluster.json"), encoding: .utf8)
        try withNamespace("rootsync") { ns in
            try FakeKubeAPI.with(data: cluster) { api in
                for name in ["kubeconfig", "ca.crt"] {
                    _ = try? FileManager.default.removeItem(atPath: root.root + "/work/" + name)
                    try FileManager.default.copyItem(atPath: api.directory.appendingPathComponent(name).path, toPath: root.root + "/work/" + name)
                }
                // A process in the namespace, whose /proc/PID/ns/net the chrooted agent enters.
                let holder = try LoggingProcess(["ip", "netns", "exec", ns.name, "sleep", "300"],
                                                logPath: api.directory.appendingPathComponent("holder.log").path)
                defer { holder.stop() }
                usleep(300_000)
                let r = try root.run(["sync", "--kubeconfig", "/work/kubeconfig", "--netns", "/proc/\(holder.pid)/ns/net",
                                      "--metrics-bind-address", "0", "--healthz-bind-address", "0", "--min-sync-period", "0s",
                                      "--log-format", "json", "--external-ip-cidr", "192.0.2.0/24"], netns: nil, timeout: 20)
                #expect(r.timedOut, "sync should run until stopped: \(r)")
                #expect(r.stderr.contains("\"msg\":\"synced\""), "\(r.stderr)")
                let table = try ns.nft("list", "table", "inet", "hostnet-dnat")
                #expect(table.contains("203.0.113.10 . tcp . 443"), "\(table)")
            }
        }
    }

    /// The check can fail: the same root without libmnl (hard-linked copy) refuses to start the binary.
    @Test func aRootMissingASharedLibraryFailsToRunTheBinary() throws {
        guard try requireKernelTests(tools: Self.tools) else { return }
        let root = try RuntimeRoot.shared()
        let copy = try root.copyWithout(libraryPrefix: "libmnl.so")
        defer { copy.remove() }
        let r = try copy.run(["--version"], netns: nil, timeout: 60)
        #expect(!r.succeeded)
        #expect(r.stderr.contains("libmnl.so.0"), "\(r)")
    }

    @Test func theDockerfilesRuntimeStageAndBuildLineAreWhatTheCheckReads() throws {
        let d = try Dockerfile.read()
        #expect(d.runtimeBase == "debian:bookworm-slim")
        #expect(d.runtimePackages.contains("libnftnl11") && d.runtimePackages.contains("libmnl0"))
        #expect(d.buildArguments.contains("--static-swift-stdlib"))
        #expect(d.buildArguments.contains("release") && d.buildArguments.contains("hostnet-dnat"))
    }
}

/// The parts of examples/deploy/Dockerfile the runtime check follows.
struct Dockerfile {
    var buildArguments: [String]      // after `swift build`
    var runtimeBase: String           // the last FROM
    var runtimePackages: [String]     // apt-get install in the last stage

    static func read() throws -> Dockerfile {
        let text = try String(contentsOf: deployFolder.appendingPathComponent("Dockerfile"), encoding: .utf8)
        // Join continuation lines, drop comments.
        let logical = text.replacingOccurrences(of: "\\\n", with: " ").split(separator: "\n")
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.hasPrefix("#") }
        guard let lastFrom = logical.lastIndex(where: { $0.hasPrefix("FROM ") }) else { throw TestSupportError("Dockerfile: no FROM") }
        let base = String(logical[lastFrom].split(separator: " ")[1])
        /// Each `RUN`'s `&&`-separated commands, as words.
        func commands(_ lines: ArraySlice<String>) -> [[String]] {
            var out: [[String]] = []
            for line in lines where line.hasPrefix("RUN ") {
                for part in line.dropFirst(4).components(separatedBy: "&&") {
                    out.append(part.split(separator: " ").map { String($0) })
                }
            }
            return out
        }
        var packages: [String] = []
        for cmd in commands(logical[lastFrom...]) {
            guard let i = cmd.firstIndex(of: "install"), i > 0, cmd[i - 1] == "apt-get" else { continue }
            packages += cmd[(i + 1)...].filter { !$0.hasPrefix("-") }
        }
        guard let build = commands(logical[..<lastFrom]).first(where: { $0.starts(with: ["swift", "build"]) }) else {
            throw TestSupportError("Dockerfile: no `swift build` in the build stage")
        }
        guard !packages.isEmpty else { throw TestSupportError("Dockerfile: no apt-get install in the runtime stage") }
        return Dockerfile(buildArguments: Array(build.dropFirst(2)), runtimeBase: base, runtimePackages: packages)
    }
}

/// A built binary plus a cached Debian root to run it in.
final class RuntimeRoot: @unchecked Sendable {
    let root: String
    let binary: String

    private init(root: String, binary: String) {
        self.root = root
        self.binary = binary
    }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var cached: Result<RuntimeRoot, any Error>?

    /// Built once per test process.
    static func shared() throws -> RuntimeRoot {
        lock.lock()
        defer { lock.unlock() }
        if cached == nil { cached = Result { try make() } }
        return try cached!.get()
    }

    static let cacheFolder = ProcessInfo.processInfo.environment["HOSTNET_DNAT_ROOTFS_CACHE"] ?? "/var/cache/hostnet-dnat-rootfs"

    private static func make() throws -> RuntimeRoot {
        let dockerfile = try Dockerfile.read()
        guard dockerfile.runtimeBase.hasPrefix("debian:"), let suite = dockerfile.runtimeBase.split(separator: ":").last?.split(separator: "-").first else {
            throw TestSupportError("the runtime stage is \(dockerfile.runtimeBase), not a Debian image this check can rebuild")
        }
        let started = Date()
        let binary = try buildRelease(arguments: dockerfile.buildArguments)
        let built = Date()
        let root = try debootstrap(suite: String(suite), packages: dockerfile.runtimePackages)
        print("runtime root: release build \(Int(built.timeIntervalSince(started))) s, root \(Int(Date().timeIntervalSince(built))) s (\(root))")
        let r = RuntimeRoot(root: root, binary: binary)
        try r.install()
        return r
    }

    /// `swift build <the Dockerfile's arguments> --scratch-path .build-release`, from the package root.
    /// The release build's folder: outside the checkout and kept on the machine (like the root), so that a
    /// fresh clone (CI) rebuilds only this package's modules, not its dependencies. HOSTNET_DNAT_RELEASE_BUILD
    /// overrides it.
    static let releaseScratch = ProcessInfo.processInfo.environment["HOSTNET_DNAT_RELEASE_BUILD"] ?? "/var/cache/hostnet-dnat-build/release"

    private static func buildRelease(arguments: [String]) throws -> String {
        _ = FileManager.default.changeCurrentDirectoryPath(packageRoot.path)
        let args = ["build"] + arguments + ["--scratch-path", releaseScratch]
        try Tools.runChecked("swift", args, timeout: 3600)
        let binPath = try Tools.runChecked("swift", ["build"] + arguments.filter { $0 != "--product" && $0 != "hostnet-dnat" }
                                            + ["--scratch-path", releaseScratch, "--show-bin-path"], timeout: 600)
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let binary = binPath + "/hostnet-dnat"
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw TestSupportError("no binary at \(binary) after \(args)") }
        return binary
    }

    /// The Debian mirror apt uses on this machine (deb822 `.sources` or `sources.list`), for the suite.
    static func mirror(suite: String) -> String {
        if let env = ProcessInfo.processInfo.environment["HOSTNET_DNAT_DEBIAN_MIRROR"] { return env }
        let dir = "/etc/apt/sources.list.d"
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".sources") }.sorted().map { dir + "/" + $0 }
        for file in files {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { continue }
            for stanza in text.components(separatedBy: "\n\n") {
                var fields: [String: String] = [:]
                for line in stanza.split(separator: "\n") where !line.hasPrefix("#") {
                    if let colon = line.firstIndex(of: ":") {
                        fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                    }
                }
                let suites = (fields["suites"] ?? "").split(separator: " ").map(String.init)
                if suites.contains(suite), fields["enabled"]?.lowercased() != "no", let uri = fields["uris"]?.split(separator: " ").first {
                    return String(uri)
                }
            }
        }
        if let text = try? String(contentsOfFile: "/etc/apt/sources.list", encoding: .utf8) {
            for line in text.split(separator: "\n") {
                let f = line.split(separator: " ").filter { !$0.hasPrefix("[") && !$0.hasSuffix("]") }
                if f.count >= 3, f[0] == "deb", f[2] == suite { return String(f[1]) }
            }
        }
        return "http://deb.debian.org/debian"
    }

    /// A stable key (FNV-1a 64) for the cache folder: suite, variant, mirror and the sorted package list.
    static func cacheKey(_ parts: [String]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in parts.joined(separator: "\n").utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return String(h, radix: 16)
    }

    private static func debootstrap(suite: String, packages: [String]) throws -> String {
        let mirror = mirror(suite: suite)
        let key = cacheKey([suite, "minbase", mirror] + packages.sorted())
        let dir = "\(cacheFolder)/\(suite)-\(key)"
        let marker = dir + "/.hostnet-dnat-complete"
        if FileManager.default.fileExists(atPath: marker) { return dir }
        try FileManager.default.createDirectory(atPath: cacheFolder, withIntermediateDirectories: true)
        let partial = "\(dir).partial-\(getpid())"
        defer { _ = try? Tools.run("rm", ["-rf", "--one-file-system", partial], timeout: 300) }
        try Tools.runChecked("debootstrap", ["--variant=minbase", "--include=" + packages.joined(separator: ","), suite, partial, mirror],
                             timeout: 1800)
        // Only what the image has: no apt lists, no caches (debootstrap leaves the .debs in var/cache/apt).
        _ = try? Tools.run("sh", ["-c", "rm -rf '\(partial)'/var/cache/apt/archives/*.deb '\(partial)'/var/lib/apt/lists/*"])
        try Data().write(to: URL(fileURLWithPath: partial + "/.hostnet-dnat-complete"))
        if rename(partial, dir) != 0 && !FileManager.default.fileExists(atPath: marker) {
            throw TestSupportError("cannot move \(partial) to \(dir): \(String(cString: strerror(errno)))")
        }
        return dir
    }

    /// Copies the binary and the inputs in (the root itself is shared by runs; the files are simply replaced).
    private func install() throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/usr/local/bin", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: root + "/work", withIntermediateDirectories: true)
        for (from, to) in [(binary, "/usr/local/bin/hostnet-dnat"),
                           (packageRoot.appendingPathComponent("examples/cluster.yaml").path, "/work/cluster.yaml")] {
            _ = try? fm.removeItem(atPath: root + to)
            try fm.copyItem(atPath: from, toPath: root + to)
        }
        // The mount point for the node locks (the host's directory in the pod, a scratch directory here).
        try fm.createDirectory(atPath: root + "/run/hostnet-dnat", withIntermediateDirectories: true)
    }

    /// Runs `hostnet-dnat <args>` chrooted in the root, in a private mount namespace where the root is
    /// read-only (readOnlyRootFilesystem), /proc and /dev are mounted as a container has them, and only the
    /// lock directory is writable. With `netns`, inside that network namespace.
    func run(_ args: [String], netns: TestNamespace?, timeout: Double) throws -> ProcessResult {
        let lock = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-rootfs-lock-\(getpid())").path
        try FileManager.default.createDirectory(atPath: lock, withIntermediateDirectories: true)
        let script = """
            set -e
            root=$1; lock=$2; shift 2
            mount --bind "$root" "$root"
            mount -o remount,bind,ro "$root"
            mount -t proc proc "$root/proc"
            mount --bind /dev "$root/dev"
            mount --bind "$lock" "$root/run/hostnet-dnat"
            exec chroot "$root" /usr/local/bin/hostnet-dnat "$@"
            """
        let command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", root, lock] + args
        if let netns { return try netns.run(command, timeout: timeout) }
        return try Tools.run(command[0], Array(command.dropFirst()), timeout: timeout)
    }

    /// A hard-linked copy of the root without the files whose names start with `libraryPrefix`.
    func copyWithout(libraryPrefix: String) throws -> RuntimeRoot {
        let copy = "\(root).without-\(libraryPrefix)-\(getpid())"
        _ = try? Tools.run("rm", ["-rf", "--one-file-system", copy], timeout: 300)
        try Tools.runChecked("cp", ["-al", root, copy], timeout: 300)
        var removed = 0
        for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib"] {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: copy + dir)) ?? [] where name.hasPrefix(libraryPrefix) {
                if (try? FileManager.default.removeItem(atPath: copy + dir + "/" + name)) != nil { removed += 1 }
            }
        }
        guard removed > 0 else { throw TestSupportError("no \(libraryPrefix)* in \(root): the negative check would prove nothing") }
        return RuntimeRoot(root: copy, binary: binary)
    }

    func remove() {
        _ = try? Tools.run("rm", ["-rf", "--one-file-system", root], timeout: 300)
    }
}
