import KubeObjects
import NetAddress
import Testing

private func load(_ text: String, source: String = "test.json") throws -> ClusterObjects {
    try DocumentLoader.load(Array(text.utf8), source: source)
}

private func loadError(_ text: String, source: String = "in.yaml") -> InputError? {
    do { _ = try load(text, source: source); return nil } catch { return error as? InputError }
}

@Suite struct DecodingTests {
    @Test func readsAKubectlListWithServicesAndSlices() throws {
        let objects = try load("""
        {"apiVersion":"v1","kind":"List","items":[
          {"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop","labels":{"app":"web"},"uid":"x"},
           "spec":{"type":"LoadBalancer","clusterIP":"198.18.0.10","clusterIPs":["198.18.0.10","2001:db8::10"],
                   "ipFamilies":["IPv4","IPv6"],"ports":[{"name":"http","port":80,"targetPort":"http","protocol":"TCP"}],
                   "unknownField":{"deep":[1,2,3]}},
           "status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.10","ipMode":"VIP"},{"hostname":"lb.example.com"}]}}},
          {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"web-1","namespace":"shop",
           "labels":{"kubernetes.io/service-name":"web"}},"addressType":"IPv4",
           "ports":[{"name":"http","port":8080,"protocol":"TCP"}],
           "endpoints":[{"addresses":["198.51.100.1"],"conditions":{"ready":false,"serving":true,"terminating":true}}]},
          {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}
        ]}
        """)
        #expect(objects.services.count == 1)
        let svc = objects.services[0]
        #expect(svc.id.description == "shop/web")
        #expect(svc.clusterIPs.map(\.description) == ["198.18.0.10", "2001:db8::10"])
        #expect(svc.ipFamilies == [.ipv4, .ipv6])
        #expect(svc.ports == [ServicePort(name: "http", protocol: .tcp, port: 80, targetPort: "http")])
        #expect(svc.loadBalancerIngress.count == 2)
        #expect(svc.loadBalancerIngress[1].ip == nil && svc.loadBalancerIngress[1].hostname == "lb.example.com")
        #expect(objects.endpointSlices.count == 1)
        let e = objects.endpointSlices[0].endpoints[0]
        #expect(!e.isReady && e.isServingTerminating)
        #expect(objects.ignoredKinds == ["ConfigMap": 1])
    }

    @Test func typedListItemsWithoutKindTakeTheListsKind() throws {
        let objects = try load("""
        {"kind":"ServiceList","apiVersion":"v1","metadata":{"continue":""},"items":[
          {"metadata":{"name":"a","namespace":"n"},"spec":{"ports":[{"port":53,"protocol":"UDP"}]}}]}
        """)
        #expect(objects.services.map(\.id.description) == ["n/a"])
        #expect(objects.services[0].ports[0].protocol == .udp)
    }

    @Test func readsMultiDocumentYAML() throws {
        let objects = try load("""
        apiVersion: v1
        kind: Service
        metadata: {name: a, namespace: n}
        spec:
          externalIPs: [192.0.2.1]
          ports:
          - port: 443
            targetPort: 8443
        ---
        # an empty document follows
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: a-x
          namespace: n
          labels: {kubernetes.io/service-name: a}
        addressType: IPv6
        ports: [{name: "", port: 8443}]
        endpoints:
        - addresses: ["2001:db8::5"]
        """, source: "multi.yaml")
        #expect(objects.services.count == 1)
        #expect(objects.services[0].ports[0].targetPort == "8443")
        #expect(objects.services[0].externalIPs == [IPAddress("192.0.2.1")!])
        #expect(objects.endpointSlices[0].family == .ipv6)
        #expect(objects.endpointSlices[0].endpoints[0].isReady)
    }

    @Test func malformedJSONNamesFileLineAndColumn() throws {
        let e = try #require(loadError("{\"kind\": \"List\",\n  \"items\": [}", source: "cluster.json"))
        #expect(e.description.hasPrefix("cluster.json: malformed JSON at line 2, column 13"))
    }

    @Test func malformedYAMLNamesTheFile() throws {
        let e = try #require(loadError("kind: Service\nmetadata: {name: [unclosed\n", source: "svc.yaml"))
        #expect(e.description.hasPrefix("svc.yaml: malformed YAML"))
    }

    @Test func invalidIPNamesObjectAndField() throws {
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"ports":[{"port":80}],"externalIPs":["192.0.2.1","192.0.2.300"]}}
        """, source: "c.json"))
        #expect(e.object == "Service shop/web")
        #expect(e.field == "spec.externalIPs[1]")
        #expect(e.description == "c.json: Service shop/web: spec.externalIPs[1]: \"192.0.2.300\" is not a valid IP address")
    }

    @Test(arguments: [
        ("\"80\"", "expected a port number, got the string \"80\""),
        ("0", "port 0 is out of range 1-65535"),
        ("65536", "port 65536 is out of range 1-65535"),
        ("80.5", "port 80.5 is not a whole number"),
    ])
    func invalidPortNamesTheField(port: String, message: String) throws {
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"s","namespace":"n"},"spec":{"ports":[{"port":1},{"port":\(port)}]}}
        """))
        #expect(e.field == "spec.ports[1].port")
        #expect(e.message == message)
    }

    @Test func sliceAddressOfTheWrongFamilyIsAnError() throws {
        let e = try #require(loadError("""
        {"kind":"EndpointSlice","metadata":{"name":"s-1","namespace":"n","labels":{"kubernetes.io/service-name":"s"}},
         "addressType":"IPv4","endpoints":[{"addresses":["2001:db8::1"]}]}
        """))
        #expect(e.object == "EndpointSlice n/s-1")
        #expect(e.field == "endpoints[0].addresses[0]")
    }

    @Test func unknownProtocolAndMissingNameAreErrors() throws {
        let p = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"s","namespace":"n"},"spec":{"ports":[{"port":1,"protocol":"ICMP"}]}}
        """))
        #expect(p.field == "spec.ports[0].protocol")
        let n = try #require(loadError("{\"kind\":\"Service\",\"metadata\":{}}"))
        #expect(n.field == "metadata.name")
    }

    @Test func controlCharactersInNamesAreNotEchoedRaw() throws {
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"a\\nb","namespace":"n"},"spec":{"externalIPs":["x"]}}
        """))
        #expect(!e.description.contains("\n"))
    }

    @Test func aSpecThatIsNotAnObjectIsAnError() throws {
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":5}
        """))
        #expect(e.object == "Service shop/web")
        #expect(e.field == "spec")
        #expect(e.message == "expected an object, got a number")
    }

    @Test func sliceLastChangeTriggerTimeIsTheRawAnnotation() throws {
        let o = try load("""
        [{"kind":"EndpointSlice","metadata":{"name":"a","namespace":"n","annotations":
           {"endpoints.kubernetes.io/last-change-trigger-time":"2026-12-01T14:00:00Z"}},"addressType":"IPv4"},
         {"kind":"EndpointSlice","metadata":{"name":"b","namespace":"n","annotations":
           {"endpoints.kubernetes.io/last-change-trigger-time":7}},"addressType":"IPv4"},
         {"kind":"EndpointSlice","metadata":{"name":"c","namespace":"n"},"addressType":"IPv4"}]
        """)
        #expect(o.endpointSlices.map(\.lastChangeTriggerTime) == ["2026-12-01T14:00:00Z", nil, nil])
        // Two versions of a slice that differ only in the trigger time are different versions.
        var later = o.endpointSlices[0]
        later.lastChangeTriggerTime = "2026-12-01T14:00:05Z"
        #expect(later != o.endpointSlices[0])
    }

    @Test func sourceRangesAndTheirAnnotationAreKeptAsWritten() throws {
        let o = try load("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop",
           "annotations":{"service.beta.kubernetes.io/load-balancer-source-ranges":" 192.0.2.0/24,2001:db8::/32"}},
         "spec":{"type":"LoadBalancer","loadBalancerSourceRanges":[" 203.0.113.0/25 ","bad"],"ports":[{"port":80}]}}
        """)
        #expect(o.services[0].loadBalancerSourceRanges == [" 203.0.113.0/25 ", "bad"])
        #expect(o.services[0].loadBalancerSourceRangesAnnotation == " 192.0.2.0/24,2001:db8::/32")
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"loadBalancerSourceRanges":"203.0.113.0/25"}}
        """))
        #expect(e.field == "spec.loadBalancerSourceRanges")
    }

    @Test(arguments: [(nil, nil), ("1", 1), ("86400", 86400), ("10800", 10800)] as [(String?, Int?)])
    func affinityTimeoutIsReadInRange(text: String?, seconds: Int?) throws {
        let config = text.map { ",\"sessionAffinityConfig\":{\"clientIP\":{\"timeoutSeconds\":\($0)}}" } ?? ""
        let o = try load("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"sessionAffinity":"ClientIP"\(config)}}
        """)
        #expect(o.services[0].sessionAffinity == "ClientIP")
        #expect(o.services[0].sessionAffinityTimeoutSeconds == seconds)
    }

    @Test(arguments: [("0", "0 is out of range 1-86400 seconds"), ("86401", "86401 is out of range 1-86400 seconds"),
                      ("\"3h\"", "expected a whole number of seconds, got a string"), ("1.5", "expected a whole number of seconds, got a number")])
    func affinityTimeoutOutOfRangeIsAnError(text: String, message: String) throws {
        let e = try #require(loadError("""
        {"kind":"Service","metadata":{"name":"web","namespace":"shop"},
         "spec":{"sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":\(text)}}}}
        """))
        #expect(e.object == "Service shop/web")
        #expect(e.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
        #expect(e.message == message)
    }

    @Test func fqdnSlicesCarryNoAddresses() throws {
        let o = try load("""
        {"kind":"EndpointSlice","metadata":{"name":"s-1","namespace":"n"},"addressType":"FQDN","endpoints":[{"addresses":["db.example.com"]}]}
        """)
        #expect(o.endpointSlices[0].family == nil)
        #expect(o.endpointSlices[0].endpoints[0].addresses.isEmpty)
    }
}

@Suite struct JSONParserTests {
    @Test func parsesEscapesAndNumbers() throws {
        let v = try JSONParser.parse(Array(#"{"a":"x\"y\u00e9\ud83d\ude00","n":-12,"d":1.5e3,"t":true,"z":null,"l":[]}"#.utf8))
        #expect(v["a"] == .string("x\"yé😀"))
        #expect(v["n"] == .int(-12))
        #expect(v["d"] == .double(1500))
        #expect(v["t"] == .bool(true))
        #expect(v["z"] == .null)
        #expect(v["l"] == .array([]))
    }

    @Test(arguments: ["{", "[1,]", "{\"a\" 1}", "01", "\"\\x\"", "[1] 2", "\"\u{1}\"", "tru", "{\"a\":\"\\ud800\"}"])
    func rejectsInvalidJSON(text: String) {
        #expect(throws: JSONSyntaxError.self) { try JSONParser.parse(Array(text.utf8)) }
    }
}

@Suite struct LabelSelectorTests {
    @Test func matchesLikeKubectl() throws {
        let labels = ["app": "web", "tier": "front", "env": "prod"]
        let cases: [(String, Bool)] = [
            ("app=web", true), ("app==web", true), ("app!=web", false), ("app=db", false),
            ("tier in (front,back)", true), ("tier notin (front)", false), ("env", true), ("!env", false),
            ("!missing", true), ("app=web,tier=back", false), ("app = web , env in ( prod )", true), ("", true),
            ("missing!=x", true), ("missing notin (x)", true),
        ]
        for (text, expected) in cases {
            #expect(try LabelSelector(text).matches(labels) == expected, "\(text)")
        }
    }

    @Test(arguments: ["app in web", "=x", "app=web,", "app in (a", "app ~ b"])
    func rejectsInvalidSelectors(text: String) {
        #expect(throws: LabelSelector.ParseError.self) { try LabelSelector(text) }
    }
}
