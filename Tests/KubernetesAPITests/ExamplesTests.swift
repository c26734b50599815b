import Foundation
import Testing
import Yams

/// Every YAML file under examples/ parses as the Kubernetes objects it claims to be; the deployment
/// manifests hold exactly the objects and privileges the README promises.
@Suite("examples/: YAML files are the Kubernetes objects they claim to be")
struct ExamplesTests {
    static let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    static let examples = repositoryRoot + "/examples"

    /// apiVersion each kind must carry.
    static let apiVersions: [String: String] = [
        "List": "v1", "Service": "v1", "ServiceAccount": "v1", "Namespace": "v1", "ConfigMap": "v1",
        "EndpointSlice": "discovery.k8s.io/v1",
        "ClusterRole": "rbac.authorization.k8s.io/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
        "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
        "DaemonSet": "apps/v1", "Deployment": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1",
    ]

    static func yamlFiles() -> [String] {
        guard let e = FileManager.default.enumerator(atPath: examples) else { return [] }
        return e.compactMap { $0 as? String }.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") }.sorted()
    }

    /// The objects of one file, with Lists expanded: (kind, object).
    static func objects(_ relative: String) throws -> [(String, Node)] {
        let text = try String(contentsOfFile: examples + "/" + relative, encoding: .utf8)
        var out: [(String, Node)] = []
        for doc in try Yams.compose_all(yaml: text) {
            if doc.null != nil { continue }
            try check(doc, in: relative, where: "document")
            let kind = doc["kind"]!.string!
            if kind == "List" {
                for (i, item) in (doc["items"]?.sequence ?? []).enumerated() {
                    try check(item, in: relative, where: "items[\(i)]")
                    out.append((item["kind"]!.string!, item))
                }
            } else {
                out.append((kind, doc))
            }
        }
        return out
    }

    struct Invalid: Error, CustomStringConvertible { var description: String }

    static func check(_ node: Node, in file: String, where locator: String) throws {
        guard node.mapping != nil else { throw Invalid(description: "\(file) \(locator): not a mapping") }
        guard let kind = node["kind"]?.string, !kind.isEmpty else { throw Invalid(description: "\(file) \(locator): no kind") }
        guard let apiVersion = node["apiVersion"]?.string, !apiVersion.isEmpty else {
            throw Invalid(description: "\(file) \(locator): \(kind) has no apiVersion")
        }
        guard let expected = apiVersions[kind] else {
            throw Invalid(description: "\(file) \(locator): kind \(kind) is not in the test's table; add it with its apiVersion")
        }
        guard apiVersion == expected else {
            throw Invalid(description: "\(file) \(locator): \(kind) has apiVersion \(apiVersion), expected \(expected)")
        }
        if kind != "List" {
            guard let name = node["metadata"]?["name"]?.string, !name.isEmpty else {
                throw Invalid(description: "\(file) \(locator): \(kind) has no metadata.name")
            }
        }
    }

    @Test("there are YAML files, and the deployment files are among them")
    func filesExist() {
        let files = Self.yamlFiles()
        #expect(files.contains("deploy/rbac.yaml"))
        #expect(files.contains("deploy/daemonset.yaml"))
        #expect(files.contains("deploy/job.yaml"))
    }

    @Test("each YAML file parses; every object has kind, the right apiVersion and metadata.name",
          arguments: ExamplesTests.yamlFiles())
    func parses(file: String) throws {
        let objects = try Self.objects(file)
        #expect(!objects.isEmpty, "\(file) holds no object")
    }

    @Test("deploy/ files hold exactly the kinds they are named for")
    func deployKinds() throws {
        #expect(try Self.objects("deploy/rbac.yaml").map(\.0) == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"])
        #expect(try Self.objects("deploy/daemonset.yaml").map(\.0) == ["DaemonSet"])
        #expect(try Self.objects("deploy/job.yaml").map(\.0) == ["Job"])
    }

    @Test("the ClusterRole grants list and watch on services and endpointslices, nothing more; the binding ties it to the ServiceAccount")
    func rbacIsMinimal() throws {
        let objects = try Self.objects("deploy/rbac.yaml")
        let sa = objects[0].1, role = objects[1].1, binding = objects[2].1
        var grants: [String] = []
        for rule in role["rules"]?.sequence ?? [] {
            let groups = rule["apiGroups"]?.sequence?.compactMap(\.string) ?? []
            let resources = rule["resources"]?.sequence?.compactMap(\.string) ?? []
            let verbs = rule["verbs"]?.sequence?.compactMap(\.string) ?? []
            #expect(rule["resourceNames"] == nil && rule["nonResourceURLs"] == nil)
            for g in groups { for r in resources { for v in verbs { grants.append("\(g)/\(r):\(v)") } } }
        }
        #expect(grants.sorted() == ["/services:list", "/services:watch",
                                    "discovery.k8s.io/endpointslices:list", "discovery.k8s.io/endpointslices:watch"])
        #expect(binding["roleRef"]?["kind"]?.string == "ClusterRole")
        #expect(binding["roleRef"]?["name"]?.string == role["metadata"]?["name"]?.string)
        let subject = try #require(binding["subjects"]?.sequence?.first)
        #expect(subject["kind"]?.string == "ServiceAccount")
        #expect(subject["name"]?.string == sa["metadata"]?["name"]?.string)
        #expect(subject["namespace"]?.string == sa["metadata"]?["namespace"]?.string)
    }

    /// The pod spec of a DaemonSet or Job.
    static func podSpec(_ file: String) throws -> (Node, namespace: String?) {
        let obj = try objects(file)[0].1
        return (try #require(obj["spec"]?["template"]?["spec"]), obj["metadata"]?["namespace"]?.string)
    }

    static func checkApplyContainer(_ c: Node, file: String, command: String = "apply") {
        #expect(c["image"]?.string == "REGISTRY/hostnet-dnat:VERSION", "\(file): image placeholder")
        #expect(c["args"]?.sequence?.first?.string == command, "\(file): runs hostnet-dnat \(command)")
        let sc = c["securityContext"]
        #expect(sc?["privileged"]?.bool != true, "\(file): not privileged")
        #expect(sc?["allowPrivilegeEscalation"]?.bool == false)
        #expect(sc?["capabilities"]?["add"]?.sequence?.compactMap(\.string) == ["NET_ADMIN"], "\(file): NET_ADMIN only")
        #expect(sc?["capabilities"]?["drop"]?.sequence?.compactMap(\.string) == ["ALL"], "\(file): drops ALL")
    }

    @Test("DaemonSet: hostNetwork, one container running sync with NET_ADMIN only; the RBAC ServiceAccount")
    func daemonSet() throws {
        let (spec, namespace) = try Self.podSpec("deploy/daemonset.yaml")
        let sa = try Self.objects("deploy/rbac.yaml")[0].1
        #expect(spec["hostNetwork"]?.bool == true)
        #expect(spec["serviceAccountName"]?.string == sa["metadata"]?["name"]?.string)
        #expect(namespace == sa["metadata"]?["namespace"]?.string)
        #expect(spec["initContainers"] == nil)
        let containers = spec["containers"]?.sequence ?? []
        #expect(containers.count == 1)
        if let first = containers.first { Self.checkApplyContainer(first, file: "daemonset.yaml", command: "sync") }
        // The DaemonSet's selector matches its pods.
        let ds = try Self.objects("deploy/daemonset.yaml")[0].1
        let selector = ds["spec"]?["selector"]?["matchLabels"]?.mapping
        let labels = ds["spec"]?["template"]?["metadata"]?["labels"]?.mapping
        #expect(selector != nil)
        for (k, v) in selector ?? [:] { #expect(labels?[k] == v) }
    }

    @Test("Job: one node, hostNetwork, apply with NET_ADMIN only, never restarted in place")
    func job() throws {
        let (spec, namespace) = try Self.podSpec("deploy/job.yaml")
        #expect(spec["hostNetwork"]?.bool == true)
        #expect(spec["nodeName"]?.string == "NODE_NAME")
        #expect(spec["restartPolicy"]?.string == "Never")
        #expect(spec["serviceAccountName"]?.string == "hostnet-dnat")
        #expect(namespace == "kube-system")
        let containers = spec["containers"]?.sequence ?? []
        #expect(containers.count == 1)
        if let c = containers.first { Self.checkApplyContainer(c, file: "job.yaml") }
    }

    @Test("Dockerfile: multi-stage Swift build, slim Debian runtime with libnftnl11 and libmnl0 only")
    func dockerfile() throws {
        let text = try String(contentsOfFile: Self.examples + "/deploy/Dockerfile", encoding: .utf8)
        let froms = text.split(separator: "\n").filter { $0.hasPrefix("FROM ") }
        #expect(froms.count == 2)
        #expect(froms.first?.contains("swift:") == true)
        #expect(froms.last == "FROM debian:bookworm-slim")
        let runtime = text.components(separatedBy: "FROM debian:bookworm-slim").last ?? ""
        #expect(runtime.contains("apt-get install -y --no-install-recommends libnftnl11 libmnl0 \\"))
        #expect(text.contains("--static-swift-stdlib"))
    }
}
