import NetAddress

/// Bad input: names the source, the object and the field, so a user can find it in a 10,000-object dump.
public struct InputError: Error, Sendable, Equatable, CustomStringConvertible {
    public var source: String
    /// "Service default/web", or nil when the document itself is unreadable.
    public var object: String?
    /// Field path such as `spec.ports[0].port`.
    public var field: String?
    public var message: String

    public init(source: String, object: String? = nil, field: String? = nil, message: String) {
        self.source = source; self.object = object; self.field = field; self.message = message
    }

    public var description: String {
        var parts = [source]
        if let object { parts.append(object) }
        if let field { parts.append(field) }
        parts.append(message)
        return parts.joined(separator: ": ")
    }
}

/// Reads typed fields out of one object's `JSONValue`, carrying the field path for error messages.
struct FieldReader {
    let value: JSONValue
    let path: String
    let fail: (String, String) -> InputError

    func child(_ key: String) -> FieldReader? {
        guard let v = value[key], v != .null else { return nil }
        return FieldReader(value: v, path: path.isEmpty ? key : "\(path).\(key)", fail: fail)
    }

    func error(_ message: String) -> InputError { fail(path, message) }

    func string(_ key: String) throws(InputError) -> String? {
        guard let c = child(key) else { return nil }
        guard case .string(let s) = c.value else { throw c.error("expected a string, got \(c.value.kindDescription)") }
        return s
    }

    func bool(_ key: String) throws(InputError) -> Bool? {
        guard let c = child(key) else { return nil }
        guard case .bool(let b) = c.value else { throw c.error("expected true or false, got \(c.value.kindDescription)") }
        return b
    }

    func port(_ key: String) throws(InputError) -> Int? {
        guard let c = child(key) else { return nil }
        switch c.value {
        case .int(let i) where i >= 1 && i <= 65535: return i
        case .int(let i): throw c.error("port \(i) is out of range 1-65535")
        case .double(let d): throw c.error("port \(d) is not a whole number")
        case .string(let s): throw c.error("expected a port number, got the string \"\(InputError.printable(s))\"")
        default: throw c.error("expected a port number, got \(c.value.kindDescription)")
        }
    }

    func list(_ key: String) throws(InputError) -> [FieldReader] {
        guard let c = child(key) else { return [] }
        guard case .array(let items) = c.value else { throw c.error("expected a list, got \(c.value.kindDescription)") }
        return items.enumerated().map { FieldReader(value: $1, path: "\(c.path)[\($0)]", fail: fail) }
    }

    func stringList(_ key: String) throws(InputError) -> [(String, FieldReader)] {
        var out: [(String, FieldReader)] = []
        for item in try list(key) {
            guard case .string(let s) = item.value else { throw item.error("expected a string, got \(item.value.kindDescription)") }
            out.append((s, item))
        }
        return out
    }

    func stringMap(_ key: String) throws(InputError) -> [String: String] {
        guard let c = child(key) else { return [:] }
        guard case .object(let o) = c.value else { throw c.error("expected a map, got \(c.value.kindDescription)") }
        var out: [String: String] = [:]
        for (k, v) in o {
            switch v {
            case .string(let s): out[k] = s
            case .int(let i): out[k] = String(i)
            case .bool(let b): out[k] = String(b)
            default: throw fail("\(c.path).\(k)", "expected a string, got \(v.kindDescription)")
            }
        }
        return out
    }

    func ip(_ text: String) throws(InputError) -> IPAddress {
        guard let ip = IPAddress(text) else { throw error("\"\(InputError.printable(text))\" is not a valid IP address") }
        return ip
    }

    func protocolValue(_ key: String) throws(InputError) -> TransportProtocol {
        guard let s = try string(key) else { return .tcp }
        guard let p = TransportProtocol(rawValue: s) else {
            throw child(key)!.error("unknown protocol \"\(InputError.printable(s))\" (expected TCP, UDP or SCTP)")
        }
        return p
    }
}

extension InputError {
    /// Makes text from input (or from a server) safe to echo in a one-line message: control characters are
    /// shown escaped, and at most `limit` characters are kept.
    public static func printable(_ s: String, limit: Int = 200) -> String {
        var out = ""
        for u in s.unicodeScalars.prefix(limit) {
            if u.value < 0x20 || u.value == 0x7F { out += "\\u{\(String(u.value, radix: 16))}" } else { out.unicodeScalars.append(u) }
        }
        return out
    }
}

/// Turns documents into Services and EndpointSlices. Lists, typed lists and single objects are accepted;
/// other kinds are counted; unknown fields are ignored, as Kubernetes clients do.
public enum ObjectDecoder {
    public static func decode(document: JSONValue, source: String, into result: inout ClusterObjects) throws(InputError) {
        switch document {
        case .null:
            return  // an empty YAML document
        case .array(let items):
            for (i, item) in items.enumerated() {
                try decodeItem(item, defaultKind: nil, source: source, locator: "item \(i)", into: &result)
            }
        case .object:
            try decodeItem(document, defaultKind: nil, source: source, locator: "document", into: &result)
        default:
            throw InputError(source: source, message: "expected a Kubernetes object or List, got \(document.kindDescription)")
        }
    }

    static func decodeItem(_ value: JSONValue, defaultKind: String?, source: String, locator: String,
                           into result: inout ClusterObjects) throws(InputError) {
        guard case .object = value else {
            throw InputError(source: source, object: locator, message: "expected an object, got \(value.kindDescription)")
        }
        var kind: String
        switch value["kind"] {
        case .string(let k)?: kind = k
        case nil, .null?: kind = defaultKind ?? ""
        default: throw InputError(source: source, object: locator, field: "kind", message: "expected a string")
        }
        if kind.isEmpty, value["items"] != nil { kind = "List" }
        if kind == "List" || kind.hasSuffix("List") {
            let itemKind: String? = kind == "List" ? nil : String(kind.dropLast(4))
            guard case .array(let items)? = value["items"] else {
                if value["items"] == nil || value["items"] == .null { result.sawEmptyList = true; return }
                throw InputError(source: source, object: kind, field: "items", message: "expected a list")
            }
            if items.isEmpty { result.sawEmptyList = true }
            for (i, item) in items.enumerated() {
                try decodeItem(item, defaultKind: itemKind, source: source, locator: "\(kind) items[\(i)]", into: &result)
            }
            return
        }
        switch kind {
        case "Service":
            result.services.append(try decodeService(value, source: source, locator: locator))
        case "EndpointSlice":
            result.endpointSlices.append(try decodeEndpointSlice(value, source: source, locator: locator))
        case "":
            throw InputError(source: source, object: locator, field: "kind", message: "missing; cannot tell what this object is")
        default:
            result.ignoredKinds[kind, default: 0] += 1
        }
    }

    static func objectName(_ value: JSONValue, kind: String, source: String, locator: String) throws(InputError) -> ObjectName {
        let meta = FieldReader(value: value, path: "", fail: { InputError(source: source, object: "\(kind) (\(locator))", field: $0, message: $1) })
        guard let name = try meta.child("metadata")?.string("name"), !name.isEmpty else {
            throw InputError(source: source, object: "\(kind) (\(locator))", field: "metadata.name", message: "missing")
        }
        let ns = try meta.child("metadata")?.string("namespace") ?? "default"
        return ObjectName(namespace: ns.isEmpty ? "default" : ns, name: name)
    }

    public static func decodeService(_ value: JSONValue, source: String, locator: String = "document") throws(InputError) -> Service {
        let id = try objectName(value, kind: "Service", source: source, locator: locator)
        let label = "Service \(InputError.printable(id.description))"
        let root = FieldReader(value: value, path: "", fail: { InputError(source: source, object: label, field: $0, message: $1) })
        var svc = Service(id: id)
        svc.labels = try root.child("metadata")?.stringMap("labels") ?? [:]
        guard let spec = root.child("spec") else { return svc }
        // Without this, `spec: 5` would read as a spec with no fields: a Service that silently lost its ports.
        guard case .object = spec.value else { throw spec.error("expected an object, got \(spec.value.kindDescription)") }
        svc.type = try spec.string("type") ?? "ClusterIP"
        svc.sessionAffinity = try spec.string("sessionAffinity")
        if let t = spec.child("sessionAffinityConfig")?.child("clientIP")?.child("timeoutSeconds") {
            switch t.value {
            case .int(let i) where i >= 1 && i <= Service.maxAffinityTimeoutSeconds: svc.sessionAffinityTimeoutSeconds = i
            case .int(let i): throw t.error("\(i) is out of range 1-\(Service.maxAffinityTimeoutSeconds) seconds")
            default: throw t.error("expected a whole number of seconds, got \(t.value.kindDescription)")
            }
        }
        svc.loadBalancerSourceRanges = try spec.stringList("loadBalancerSourceRanges").map(\.0)
        // Read leniently, like the trigger-time annotation of slices: an annotation of another type is ignored.
        if case .string(let a)? = value["metadata"]?["annotations"]?[Service.sourceRangesAnnotation] {
            svc.loadBalancerSourceRangesAnnotation = a
        }

        var clusterIPTexts = try spec.stringList("clusterIPs")
        if clusterIPTexts.isEmpty, let single = try spec.string("clusterIP") {
            clusterIPTexts = [(single, spec.child("clusterIP")!)]
        }
        for (text, field) in clusterIPTexts {
            if text == "None" { svc.headless = true; continue }
            if text.isEmpty { continue }
            svc.clusterIPs.append(try field.ip(text))
        }
        for (text, field) in try spec.stringList("ipFamilies") {
            guard let f = IPFamily(rawValue: text) else {
                throw field.error("unknown IP family \"\(InputError.printable(text))\" (expected IPv4 or IPv6)")
            }
            svc.ipFamilies.append(f)
        }
        for p in try spec.list("ports") {
            guard let port = try p.port("port") else { throw p.error("port is missing") }
            var target: String? = nil
            if let t = p.child("targetPort") {
                switch t.value {
                case .int(let i): target = String(i)
                case .string(let s): target = s
                default: throw t.error("expected a number or a port name, got \(t.value.kindDescription)")
                }
            }
            svc.ports.append(ServicePort(name: try p.string("name") ?? "", protocol: try p.protocolValue("protocol"),
                                         port: port, targetPort: target))
        }
        for (text, field) in try spec.stringList("externalIPs") {
            svc.externalIPs.append(try field.ip(text))
        }
        if let lb = root.child("status")?.child("loadBalancer") {
            for entry in try lb.list("ingress") {
                var ingress = LoadBalancerIngress()
                if let ipText = try entry.string("ip"), !ipText.isEmpty {
                    ingress.ip = try entry.child("ip")!.ip(ipText)
                }
                ingress.hostname = try entry.string("hostname")
                ingress.ipMode = try entry.string("ipMode")
                svc.loadBalancerIngress.append(ingress)
            }
        }
        return svc
    }

    public static func decodeEndpointSlice(_ value: JSONValue, source: String, locator: String = "document") throws(InputError) -> EndpointSlice {
        let id = try objectName(value, kind: "EndpointSlice", source: source, locator: locator)
        let label = "EndpointSlice \(InputError.printable(id.description))"
        let root = FieldReader(value: value, path: "", fail: { InputError(source: source, object: label, field: $0, message: $1) })
        let labels = try root.child("metadata")?.stringMap("labels") ?? [:]
        guard let addressType = try root.string("addressType") else {
            throw root.error("addressType is missing").withField("addressType")
        }
        var slice = EndpointSlice(id: id, serviceName: labels["kubernetes.io/service-name"], addressType: addressType,
                                  ports: [], endpoints: [])
        // Only this one annotation is read, and leniently: an annotation of another type is not the slice's fault.
        if case .string(let t)? = value["metadata"]?["annotations"]?["endpoints.kubernetes.io/last-change-trigger-time"],
           !t.isEmpty {
            slice.lastChangeTriggerTime = t
        }
        for p in try root.list("ports") {
            slice.ports.append(EndpointPort(name: try p.string("name") ?? "", port: try p.port("port"),
                                            protocol: try p.protocolValue("protocol")))
        }
        let family = slice.family
        for e in try root.list("endpoints") {
            var endpoint = Endpoint(addresses: [])
            if family != nil {
                for (text, field) in try e.stringList("addresses") {
                    let ip = try field.ip(text)
                    guard ip.family == family else {
                        throw field.error("\(ip) is not an \(addressType) address, but the slice's addressType is \(addressType)")
                    }
                    endpoint.addresses.append(ip)
                }
            }
            if let c = e.child("conditions") {
                endpoint.ready = try c.bool("ready")
                endpoint.serving = try c.bool("serving")
                endpoint.terminating = try c.bool("terminating")
            }
            slice.endpoints.append(endpoint)
        }
        return slice
    }
}

extension InputError {
    func withField(_ f: String) -> InputError {
        var e = self; e.field = f; return e
    }
}
