import Foundation
import Testing
import TestSupport

/// Runs the built `hostnet-dnat` binary as a user would, and checks output, stderr and exit status.
struct CLI {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The binary sits beside the test bundle in the build products folder.
    static let binary: URL = {
        var dir = Bundle.main.bundleURL
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("hostnet-dnat")
            if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return root.appendingPathComponent(".build/debug/hostnet-dnat")
    }()

    struct Result { let status: Int32; let stdout: String; let stderr: String }

    /// Runs the binary from the package root (relative paths like examples/… resolve), as a user would.
    static func run(_ args: [String], stdin: String? = nil, prefix: [String] = []) throws -> Result {
        FileManager.default.changeCurrentDirectoryPath(root.path)
        let command = prefix + [binary.path] + args
        let r = try Tools.run(command[0], Array(command.dropFirst()), input: stdin, timeout: 300)
        return Result(status: r.status, stdout: r.stdout, stderr: r.stderr)
    }

    static func golden(_ name: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent("examples/rendered/\(name)"), encoding: .utf8)
    }
}

@Suite struct RenderCLITests {
    @Test(arguments: [("nft", "cluster.nft"), ("iptables", "cluster.rules.v4"), ("ip6tables", "cluster.rules.v6"), ("json", "cluster.json")])
    func rendersTheExampleLikeTheGoldenFiles(format: String, golden: String) throws {
        let r = try CLI.run(["render", "-f", "examples/cluster.yaml", "--external-ip-cidr", "192.0.2.0/24", "--format", format])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == (try CLI.golden(golden)))
        if format != "json" { #expect(r.stderr.contains("mapping(s) from 10 service(s)")) }
    }

    @Test func jsonOutputIsQuietOnStderr() throws {
        let r = try CLI.run(["render", "-f", "examples/cluster.json", "--format", "json"])
        #expect(r.status == 0)
        #expect(r.stderr.isEmpty)
        let doc = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect((doc?["mappings"] as? [Any])?.count == 8)
    }

    @Test func readsStdinAndRepeatedFiles() throws {
        let yaml = try String(contentsOf: CLI.root.appendingPathComponent("examples/cluster.yaml"), encoding: .utf8)
        let r = try CLI.run(["render", "-f", "-", "--external-ip-cidr", "192.0.2.0/24"], stdin: yaml)
        #expect(r.status == 0)
        #expect(r.stdout == (try CLI.golden("cluster.nft")))
        // Services in one file, slices in another, gives the same result as one file.
        let split = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-split-\(getpid())")
        try FileManager.default.createDirectory(at: split, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: split) }
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: CLI.root.appendingPathComponent("examples/cluster.json"))) as! [String: Any]
        let items = json["items"] as! [[String: Any]]
        for kind in ["Service", "EndpointSlice"] {
            let list: [String: Any] = ["kind": "\(kind)List", "apiVersion": "v1", "items": items.filter { $0["kind"] as? String == kind }]
            try JSONSerialization.data(withJSONObject: list).write(to: split.appendingPathComponent("\(kind).json"))
        }
        let r2 = try CLI.run(["render", "-f", split.appendingPathComponent("EndpointSlice.json").path,
                              "-f", split.appendingPathComponent("Service.json").path, "--external-ip-cidr", "192.0.2.0/24"])
        #expect(r2.status == 0, "\(r2.stderr)")
        #expect(r2.stdout == (try CLI.golden("cluster.nft")))
    }

    @Test func writesOutputFileOnlyOnSuccess() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-out-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let good = dir.appendingPathComponent("rules.nft").path
        let r = try CLI.run(["render", "-f", "examples/cluster.yaml", "--external-ip-cidr", "192.0.2.0/24", "-o", good])
        #expect(r.status == 0)
        #expect(r.stdout.isEmpty)
        #expect(try String(contentsOfFile: good, encoding: .utf8) == (try CLI.golden("cluster.nft")))
        let bad = dir.appendingPathComponent("bad.nft").path
        let r2 = try CLI.run(["render", "-f", "-", "-o", bad], stdin: "{\"kind\": \"Service\", oops}")
        #expect(r2.status == 65)
        #expect(!FileManager.default.fileExists(atPath: bad))
    }

    @Test func otherKindsAreIgnoredAndCounted() throws {
        let doc = """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: a, namespace: b}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: a, namespace: b}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: c, namespace: b}
        """
        let r = try CLI.run(["render", "-f", "-"], stdin: doc)
        #expect(r.status == 0)
        #expect(r.stderr.contains("ignored 3 object(s) of other kinds: ConfigMap (2), Deployment (1)"))
        let j = try CLI.run(["render", "-f", "-", "--format", "json"], stdin: doc)
        #expect(j.stdout.contains("ignored 3 object(s)"))
    }

    @Test func helpShowsExamples() throws {
        let r = try CLI.run(["render", "--help"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("Examples:"))
        #expect(r.stdout.contains("--external-ip-cidr"))
    }
}

@Suite struct CLIErrorTests {
    func expectFailure(_ args: [String], stdin: String? = nil, status: Int32, mentions: [String]) throws {
        let r = try CLI.run(args, stdin: stdin)
        #expect(r.status == status, "stderr: \(r.stderr)")
        #expect(r.stdout.isEmpty, "nothing may reach stdout on failure")
        for m in mentions { #expect(r.stderr.contains(m), "stderr lacks \(m): \(r.stderr)") }
        #expect(!r.stderr.contains("Fatal error"))
    }

    @Test func malformedJSON() throws {
        try expectFailure(["render", "-f", "-"], stdin: "{\"kind\": \"List\", \"items\": [", status: 65,
                          mentions: ["<stdin>: malformed JSON at line 1"])
    }

    @Test func malformedYAML() throws {
        try expectFailure(["render", "-f", "-"], stdin: "kind: Service\nmetadata: {name: [x\n", status: 65, mentions: ["malformed YAML"])
    }

    @Test func invalidIPNamesObjectAndField() throws {
        let doc = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec:
          ports: [{port: 443}]
        status:
          loadBalancer:
            ingress: [{ip: 203.0.113.300}]
        """
        try expectFailure(["render", "-f", "-"], stdin: doc, status: 65,
                          mentions: ["Service shop/web", "status.loadBalancer.ingress[0].ip", "203.0.113.300"])
    }

    @Test func invalidPort() throws {
        try expectFailure(["render", "-f", "-"], stdin: "{\"kind\":\"Service\",\"metadata\":{\"name\":\"a\",\"namespace\":\"b\"},\"spec\":{\"ports\":[{\"port\":70000}]}}",
                          status: 65, mentions: ["Service b/a", "spec.ports[0].port", "out of range"])
    }

    @Test func usageErrors() throws {
        try expectFailure(["render", "--no-such-flag"], status: 64, mentions: ["--no-such-flag"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--external-ip-cidr", "192.0.2.0/33"], status: 64, mentions: ["--external-ip-cidr"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "-l", "app in web"], status: 64, mentions: ["label selector"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--target", "magic"], status: 64, mentions: ["--target"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--format", "pf"], status: 64, mentions: ["--format"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--table", "a b"], status: 64, mentions: ["--table"])
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--chain", "DOCKER", "--format", "iptables"], status: 64, mentions: ["--chain"])
        // Settings are checked before anything touches the node or the API.
        try expectFailure(["remove", "--table", "a b"], status: 64, mentions: ["--table"])
        try expectFailure(["status", "--chain", "OUTPUT", "--backend", "iptables"], status: 64, mentions: ["--chain"])
        try expectFailure(["apply", "--table", "a b"], status: 64, mentions: ["--table"])
        try expectFailure(["apply", "-f", "examples/cluster.yaml", "--backend", "iptables", "--chain", "DOCKER"], status: 64, mentions: ["--chain"])
    }

    @Test func kubeProxyTargetIsRefusedForNft() throws {
        try expectFailure(["render", "-f", "examples/cluster.yaml", "--target", "kube-proxy", "--format", "nft"], status: 64,
                          mentions: ["--format iptables"])
        let ok = try CLI.run(["render", "-f", "examples/cluster.yaml", "--target", "kube-proxy", "--format", "iptables"])
        #expect(ok.status == 0)
        #expect(ok.stdout.contains("-j KUBE-SVC-"))
    }

    @Test func missingFile() throws {
        try expectFailure(["render", "-f", "does-not-exist.json"], status: 66, mentions: ["does-not-exist.json"])
    }

    @Test func conflictNamesBothServicesUnlessSkipped() throws {
        let doc = """
        {"kind":"List","items":[
         {"kind":"Service","metadata":{"name":"one","namespace":"a"},"spec":{"clusterIP":"198.18.0.1","ports":[{"port":443}]},
          "status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.5"}]}}},
         {"kind":"Service","metadata":{"name":"two","namespace":"b"},"spec":{"clusterIP":"198.18.0.2","ports":[{"port":443}]},
          "status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.5"}]}}}]}
        """
        try expectFailure(["render", "-f", "-", "--target", "cluster-ip"], stdin: doc, status: 65, mentions: ["a/one", "b/two", "203.0.113.5:443/TCP"])
        let r = try CLI.run(["render", "-f", "-", "--target", "cluster-ip", "--on-conflict", "skip", "--format", "json"], stdin: doc)
        #expect(r.status == 0)
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        #expect((json["mappings"] as! [Any]).isEmpty)
        #expect((json["conflicts"] as! [Any]).count == 1)
    }

    @Test func autoWithoutSlicesWarnsAboutOneDNATPerConnection() throws {
        let doc = """
        {"kind":"Service","metadata":{"name":"one","namespace":"a"},"spec":{"clusterIP":"198.18.0.1","ports":[{"port":443}]},
         "status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.5"}]}}}
        """
        let r = try CLI.run(["render", "-f", "-"], stdin: doc)
        #expect(r.status == 0)
        #expect(r.stderr.contains("one DNAT per connection"))
        #expect(r.stdout.contains("203.0.113.5 . tcp . 443 . 0 : 198.18.0.1 . 443"))
    }
}
