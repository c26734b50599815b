import Foundation
import Testing
import TestSupport
import Yams

/// The package root (Tests/DeploymentTests/<this file> → up three).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let deployFolder = packageRoot.appendingPathComponent("examples/deploy")

/// Whether an external tool a deployment test needs is there. Like `requireKernelTests`: a visible skip
/// normally, a failure under `CI=true` (so CI cannot pass by skipping).
func requireTool(_ path: String?, _ what: String, function: String = #function) throws -> String? {
    if let path { return path }
    if ProcessInfo.processInfo.environment["CI"]?.lowercased() == "true" {
        throw TestSupportError("\(function) cannot run under CI=true: \(what) not found (scripts/install-deps test installs it)")
    }
    print("skipping \(function): \(what) not found (scripts/install-deps test installs it)")
    return nil
}

/// Every manifest in examples/deploy against the Kubernetes OpenAPI schema, strictly (unknown fields are
/// errors), with PyPI `kubernetes-validate` and its bundled schemas (no cluster, no network).
@Suite struct ManifestTests {
    /// The Kubernetes versions checked: the oldest still commonly run, and the newest the pinned validator bundles.
    static let kubernetesVersions = ["1.30", "1.31"]

    /// `$KUBERNETES_VALIDATE`, else the virtualenv scripts/install-deps makes, else `$PATH`.
    static var validator: String? {
        if let env = ProcessInfo.processInfo.environment["KUBERNETES_VALIDATE"], FileManager.default.isExecutableFile(atPath: env) { return env }
        let venv = "/opt/hostnet-dnat-test-tools/bin/kubernetes-validate"
        if FileManager.default.isExecutableFile(atPath: venv) { return venv }
        return Tools.locate("kubernetes-validate")
    }

    static var manifests: [URL] {
        ((try? FileManager.default.contentsOfDirectory(at: deployFolder, includingPropertiesForKeys: nil)) ?? [])
            .filter { $0.pathExtension == "yaml" || $0.pathExtension == "yml" }
            .sorted { $0.path < $1.path }
    }

    func validate(_ files: [String], version: String) throws -> ProcessResult? {
        guard let tool = try requireTool(Self.validator, "kubernetes-validate") else { return nil }
        return try Tools.run(tool, ["--strict", "--kubernetes-version", version] + files, timeout: 120)
    }

    @Test func theDeployFolderHasTheManifestsWeShip() {
        #expect(Self.manifests.map(\.lastPathComponent) == ["daemonset.yaml", "job.yaml", "rbac.yaml"])
    }

    @Test(arguments: kubernetesVersions)
    func everyManifestPassesStrictSchemaValidation(version: String) throws {
        guard let r = try validate(Self.manifests.map(\.path), version: version) else { return }
        #expect(r.succeeded, "\(r)")
        // Every object in every file was checked (5: DaemonSet, Job, ServiceAccount, ClusterRole, binding).
        #expect(r.stdout.components(separatedBy: " passed for resource ").count - 1 + r.stderr.components(separatedBy: " passed for resource ").count - 1 == 5, "\(r)")
    }

    /// The check can fail: a misspelt field, a field at the wrong level, a wrong type, each in a copy.
    @Test(arguments: [
        ("daemonset.yaml", "readinessProbe:", "readinesProbe:", "readinesProbe"),
        ("daemonset.yaml", "terminationGracePeriodSeconds: 15", "terminationGracePeriodSecond: 15", "terminationGracePeriodSecond"),
        ("daemonset.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", "readOnlyRootFileSystem"),
        ("daemonset.yaml", "containerPort: 10270", "containerPort: \"10270\"", "10270"),
        ("job.yaml", "backoffLimit: 2", "backOffLimit: 2", "backOffLimit"),
        ("rbac.yaml", "verbs: [\"list\", \"watch\"]", "verb: [\"list\", \"watch\"]", "verb"),
    ])
    func aMutatedCopyFailsValidationNamingTheField(file: String, original: String, mutated: String, named: String) throws {
        let text = try String(contentsOf: deployFolder.appendingPathComponent(file), encoding: .utf8)
        #expect(text.contains(original), "the mutation no longer applies to \(file)")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-manifest-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let copy = dir.appendingPathComponent(file)
        try text.replacingOccurrences(of: original, with: mutated).write(to: copy, atomically: true, encoding: .utf8)
        guard let r = try validate([copy.path], version: Self.kubernetesVersions[0]) else { return }
        #expect(!r.succeeded, "a manifest with \(mutated) passed: \(r)")
        #expect((r.stdout + r.stderr).contains(named), "\(r)")
    }

    /// What the schema cannot know: the DaemonSet runs `sync`, its probes and ports match the flags, it holds
    /// no privilege beyond NET_ADMIN, and it shares the node lock with the Job.
    @Test func theDaemonSetRunsSyncWithProbesOnTheHealthzPortAndNetAdminOnly() throws {
        let text = try String(contentsOf: deployFolder.appendingPathComponent("daemonset.yaml"), encoding: .utf8)
        let ds = try #require(try Yams.load(yaml: text) as? [String: Any])
        let pod = try #require(((ds["spec"] as? [String: Any])?["template"] as? [String: Any])?["spec"] as? [String: Any])
        #expect(pod["hostNetwork"] as? Bool == true)
        let grace = try #require(pod["terminationGracePeriodSeconds"] as? Int)
        #expect(grace >= 10, "sync needs up to 5 s to stop cleanly")
        #expect(pod["initContainers"] == nil)
        let containers = try #require(pod["containers"] as? [[String: Any]])
        #expect(containers.count == 1)
        let c = containers[0]
        let args = try #require(c["args"] as? [String])
        #expect(args.first == "sync")
        func flag(_ name: String) -> String? {
            args.first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
        }
        let healthzPort = try #require(flag("--healthz-bind-address").flatMap { $0.split(separator: ":").last }.flatMap { Int($0) })
        let metricsPort = try #require(flag("--metrics-bind-address").flatMap { $0.split(separator: ":").last }.flatMap { Int($0) })
        let ports = try #require(c["ports"] as? [[String: Any]])
        let byName = Dictionary(uniqueKeysWithValues: ports.map { ($0["name"] as? String ?? "", $0["containerPort"] as? Int ?? 0) })
        #expect(byName["healthz"] == healthzPort)
        #expect(byName["metrics"] == metricsPort)
        let annotations = ((ds["spec"] as? [String: Any])?["template"] as? [String: Any]).flatMap { ($0["metadata"] as? [String: Any])?["annotations"] as? [String: Any] }
        #expect(annotations?["prometheus.io/port"] as? String == String(metricsPort))
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = try #require((c[probe] as? [String: Any])?["httpGet"] as? [String: Any], "\(probe)")
            #expect(get["path"] as? String == path)
            #expect(get["port"] as? String == "healthz" || get["port"] as? Int == healthzPort)
        }
        let sc = try #require(c["securityContext"] as? [String: Any])
        #expect(sc["readOnlyRootFilesystem"] as? Bool == true)
        #expect(sc["privileged"] as? Bool == false)
        #expect(sc["allowPrivilegeEscalation"] as? Bool == false)
        let caps = try #require(sc["capabilities"] as? [String: Any])
        #expect(caps["drop"] as? [String] == ["ALL"])
        #expect(caps["add"] as? [String] == ["NET_ADMIN"])
        let resources = try #require(c["resources"] as? [String: Any])
        #expect((resources["requests"] as? [String: Any])?["memory"] != nil)
        #expect((resources["limits"] as? [String: Any])?["memory"] != nil)
        // The locks are in the host's directory (a pod-private /run would let the DaemonSet and the Job both
        // "own" the node).
        for manifest in ["daemonset.yaml", "job.yaml"] {
            let t = try String(contentsOf: deployFolder.appendingPathComponent(manifest), encoding: .utf8)
            #expect(t.contains("mountPath: /run/hostnet-dnat\n") && t.contains("path: /run/hostnet-dnat\n")
                    && t.contains("type: DirectoryOrCreate"), "\(manifest)")
        }
    }
}
