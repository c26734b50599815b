import Foundation

/// One object as the API server stores it. `body` is the JSON after `metadata` (spec, status, ports, …).
struct FakeObject: Sendable {
    var kind: String
    var apiVersion: String
    var namespace: String
    var name: String
    var labels: [String: String] = [:]
    var body: String
    var resourceVersion = "4711"

    func json(withKind: Bool) -> String {
        let labelText = labels.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\"\($0.value)\"" }.joined(separator: ",")
        let meta = "\"metadata\":{\"name\":\"\(name)\",\"namespace\":\"\(namespace)\",\"uid\":\"\(UUID().uuidString.lowercased())\",\"resourceVersion\":\"\(resourceVersion)\",\"labels\":{\(labelText)}}"
        let head = withKind ? "\"kind\":\"\(kind)\",\"apiVersion\":\"\(apiVersion)\"," : ""
        return "{\(head)\(meta),\(body)}"
    }
}

/// A small cluster (documentation addresses only) and the API server's list endpoints for it, paged the
/// way kube-apiserver pages (`limit`, `metadata.continue`).
struct FakeCluster: Sendable {
    var services: [FakeObject]
    var slices: [FakeObject]
    /// Items per page, whatever `limit` the client asks (a server may return fewer).
    var pageSize = 2
    /// The lists' `metadata.resourceVersion`.
    var resourceVersion = "4711"

    static let standard = FakeCluster(services: [
        FakeObject(kind: "Service", apiVersion: "v1", namespace: "default", name: "web", labels: ["app": "web", "tier": "front"],
                   body: #""spec":{"type":"LoadBalancer","clusterIP":"192.0.2.10","clusterIPs":["192.0.2.10"],"ipFamilies":["IPv4"],"ports":[{"name":"https","protocol":"TCP","port":443,"targetPort":8443}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.10","ipMode":"VIP"}]}}"#),
        FakeObject(kind: "Service", apiVersion: "v1", namespace: "default", name: "dual", labels: ["app": "dual"],
                   body: #""spec":{"type":"LoadBalancer","clusterIPs":["192.0.2.11","2001:db8::11"],"ipFamilies":["IPv4","IPv6"],"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":"web"}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.11"},{"ip":"2001:db8:1::11"}]}}"#),
        FakeObject(kind: "Service", apiVersion: "v1", namespace: "shop", name: "api", labels: ["app": "api", "tier": "front"],
                   body: #""spec":{"type":"ClusterIP","clusterIP":"192.0.2.20","externalIPs":["198.51.100.20"],"ports":[{"protocol":"TCP","port":80,"targetPort":8080}]}"#),
        FakeObject(kind: "Service", apiVersion: "v1", namespace: "kube-system", name: "dns", labels: ["k8s-app": "kube-dns"],
                   body: #""spec":{"type":"LoadBalancer","clusterIP":"192.0.2.53","ports":[{"name":"dns","protocol":"UDP","port":53,"targetPort":53}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.53"}]}}"#),
        FakeObject(kind: "Service", apiVersion: "v1", namespace: "shop", name: "headless", labels: ["app": "db"],
                   body: #""spec":{"clusterIP":"None","ports":[{"port":5432}]}"#),
    ], slices: [
        FakeObject(kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", namespace: "default", name: "web-x1",
                   labels: ["kubernetes.io/service-name": "web"],
                   body: #""addressType":"IPv4","ports":[{"name":"https","protocol":"TCP","port":8443}],"endpoints":[{"addresses":["198.51.100.5"],"conditions":{"ready":true}},{"addresses":["198.51.100.6"],"conditions":{"ready":false,"serving":true,"terminating":true}}]"#),
        FakeObject(kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", namespace: "default", name: "dual-v4",
                   labels: ["kubernetes.io/service-name": "dual"],
                   body: #""addressType":"IPv4","ports":[{"name":"http","protocol":"TCP","port":8080}],"endpoints":[{"addresses":["198.51.100.7"]}]"#),
        FakeObject(kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", namespace: "default", name: "dual-v6",
                   labels: ["kubernetes.io/service-name": "dual"],
                   body: #""addressType":"IPv6","ports":[{"name":"http","protocol":"TCP","port":8080}],"endpoints":[{"addresses":["2001:db8::7"]}]"#),
        FakeObject(kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", namespace: "shop", name: "api-q9",
                   labels: ["kubernetes.io/service-name": "api"],
                   body: #""addressType":"IPv4","ports":[{"name":"","protocol":"TCP","port":8080}],"endpoints":[{"addresses":["198.51.100.30"]},{"addresses":["198.51.100.31"]}]"#),
        FakeObject(kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", namespace: "kube-system", name: "dns-a",
                   labels: ["kubernetes.io/service-name": "dns"],
                   body: #""addressType":"IPv4","ports":[{"name":"dns","protocol":"UDP","port":53}],"endpoints":[{"addresses":["198.51.100.53"]}]"#),
    ])

    /// The same objects as one `kind: List` file (what `kubectl get services,endpointslices -A -o json` prints).
    var listFile: String {
        let items = (services + slices).map { $0.json(withKind: true) }.joined(separator: ",\n")
        return "{\"apiVersion\":\"v1\",\"kind\":\"List\",\"metadata\":{\"resourceVersion\":\"\"},\"items\":[\n\(items)\n]}"
    }

    /// Continue tokens carry characters that must be escaped in a query (`+`, `/`, `=`).
    static func continueToken(offset: Int, generation: Int = 1) -> String { "g\(generation)+off/\(offset)==" }

    static func offset(fromToken token: String) -> (offset: Int, generation: Int)? {
        guard token.hasPrefix("g"), let plus = token.firstIndex(of: "+"), let slash = token.firstIndex(of: "/"),
              let gen = Int(token[token.index(after: token.startIndex)..<plus]),
              let off = Int(token[token.index(after: slash)...].dropLast(2)) else { return nil }
        return (off, gen)
    }

    /// Answers list requests; nil for paths it does not know.
    func reply(_ r: RecordedRequest, generation: Int = 1) -> Reply? {
        let parts = r.path.split(separator: "/").map(String.init)
        var objects: [FakeObject]
        var listKind: String
        var namespace: String? = nil
        switch parts {
        case ["api", "v1", "services"]:
            (objects, listKind) = (services, "ServiceList")
        case let p where p.count == 5 && p[0] == "api" && p[2] == "namespaces" && p[4] == "services":
            (objects, listKind, namespace) = (services, "ServiceList", p[3])
        case ["apis", "discovery.k8s.io", "v1", "endpointslices"]:
            (objects, listKind) = (slices, "EndpointSliceList")
        case let p where p.count == 6 && p[1] == "discovery.k8s.io" && p[3] == "namespaces" && p[5] == "endpointslices":
            (objects, listKind, namespace) = (slices, "EndpointSliceList", p[4])
        default:
            return nil
        }
        if let namespace { objects = objects.filter { $0.namespace == namespace } }
        if let selector = r.query["labelSelector"] {
            // Enough of the selector language for the tests: comma-separated k=v.
            let reqs = selector.split(separator: ",").map { $0.split(separator: "=", maxSplits: 1).map(String.init) }
            objects = objects.filter { o in reqs.allSatisfy { $0.count == 2 && o.labels[$0[0]] == $0[1] } }
        }
        var start = 0
        if let token = r.query["continue"] {
            guard let parsed = Self.offset(fromToken: token) else { return .json(400, status(400, "BadRequest", "invalid continue token")) }
            if parsed.generation != generation {
                return .json(410, status(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."))
            }
            start = parsed.offset
        }
        var page = objects
        var next: String? = nil
        if r.query["limit"] != nil {
            let end = min(start + pageSize, objects.count)
            page = Array(objects[start..<end])
            if end < objects.count { next = Self.continueToken(offset: end, generation: generation) }
        }
        let cont = next.map { ",\"continue\":\"\($0)\",\"remainingItemCount\":\(objects.count - start - page.count)" } ?? ""
        let apiVersion = listKind == "ServiceList" ? "v1" : "discovery.k8s.io/v1"
        let items = page.map { $0.json(withKind: false) }.joined(separator: ",")
        return .json(200, "{\"kind\":\"\(listKind)\",\"apiVersion\":\"\(apiVersion)\",\"metadata\":{\"resourceVersion\":\"\(resourceVersion)\"\(cont)},\"items\":[\(items)]}")
    }
}

/// A `kind: Status` failure body, as kube-apiserver sends.
func status(_ code: Int, _ reason: String, _ message: String, details: String? = nil) -> String {
    let escaped = message.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
    let det = details.map { ",\"details\":\($0)" } ?? ""
    return "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"\(escaped)\",\"reason\":\"\(reason)\"\(det),\"code\":\(code)}"
}

/// Thread-safe mutable state for handlers.
final class Box<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ v: T) { value = v }
    func get() -> T { lock.withLock { value } }
    func set(_ v: T) { lock.withLock { value = v } }
    func update<R>(_ f: (inout T) -> R) -> R { lock.withLock { f(&value) } }
}
